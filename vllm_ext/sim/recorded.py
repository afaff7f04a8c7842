"""TRAIL in the simulator on the length probe's real outputs, recorded once offline.

Under greedy decoding a request's tokens, and so its hidden states and the length probe's
output at each generated token, do not depend on the schedule. `record` runs the served model
once over a bench trace (offline vLLM with the ProbeWorker capturing the probe's layer), applies
the shipped (or given) length probe to every step's row and keeps, per request: the prompt-only
prediction, the probe's bin distribution at each generated token, and the output length.

`RecordedTrailPolicy` is the engine's `TrailPolicy` fed from that file: the prompt-only
prediction on arrival, and `observe` at the end of prefill and every `every` generated tokens,
as the ProbeWorker does. Everything else (Bayesian smoothing, max_tokens cap, ordering, limited
preemption, margin, cap) is TrailPolicy's own code, so a replay with recorded predictions
studies the policy on the predictions the live engine sees, in seconds instead of a live run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vllm_ext.sched.policy import RequestView
from vllm_ext.sched.trail import PromptModel, TrailPolicy


@dataclass
class RecordedPredictions:
    bin_edges: tuple[float, ...]
    prompt_pred: list[float]            # per trace request
    probs: list[np.ndarray]             # per trace request: [output_len, K], row j = j generated
    output_len: list[int]

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, bin_edges=np.asarray(self.bin_edges),
                            prompt_pred=np.asarray(self.prompt_pred),
                            output_len=np.asarray(self.output_len),
                            probs=np.concatenate(self.probs).astype(np.float32))

    @classmethod
    def load(cls, path: str | Path) -> "RecordedPredictions":
        blob = np.load(path)
        lens = [int(n) for n in blob["output_len"]]
        probs = np.split(blob["probs"], np.cumsum(lens)[:-1])
        return cls(tuple(float(e) for e in blob["bin_edges"]),
                   [float(x) for x in blob["prompt_pred"]], probs, lens)


def record(model: str, trace: str | Path, probe_path: str | None = None,
           batch: int = 64) -> RecordedPredictions:
    """Run `model` over the trace's prompts (greedy, each request's max_tokens) and record the
    length probe's output at every generated token."""
    from transformers import AutoConfig

    from vllm_ext.probes.base import load_probe, model_fingerprint, shipped_probe_path
    from vllm_ext.probes.collect import collect

    rows = [json.loads(line) for line in Path(trace).read_text().splitlines() if line.strip()]
    fingerprint = model_fingerprint(AutoConfig.from_pretrained(model), model)
    probe_path = probe_path or shipped_probe_path("length", fingerprint)
    if probe_path is None:
        raise FileNotFoundError(f"no shipped length probe for {model}; pass --probe")
    probe = load_probe(probe_path, fingerprint)  # refuses a probe for another model
    data = collect(model, rows, [probe.layer], batch=batch)
    probs = [probe(h[:, 0, :].float()).numpy() for h in data.hidden]
    meta = probe.meta.get("prompt_model")
    prompt_model = PromptModel(tuple(meta["coef"]), meta["buckets"]) if meta else None
    prompt_pred = [prompt_model.predict(ids) if prompt_model else float("inf")
                   for ids in data.prompt_ids]
    return RecordedPredictions(tuple(probe.meta["bin_edges"]), prompt_pred, probs,
                               data.output_len)


@dataclass
class RecordedTrailPolicy(TrailPolicy):
    """TrailPolicy whose predictions come from a `RecordedPredictions` file; simulator request
    ids are trace indices."""
    recorded: RecordedPredictions | None = None
    every: int = 8
    observed_at: dict[str, int] = field(default_factory=dict)

    def _catch_up(self, view: RequestView) -> None:
        rid, index = view.request_id, int(view.request_id)
        if rid not in self.prompt_pred:
            self.prompt_pred[rid] = self.recorded.prompt_pred[index]
        if not self.refine:
            return
        probs = self.recorded.probs[index]
        last = self.observed_at.get(rid, -self.every)
        generated = min(view.num_output_tokens, len(probs) - 1)
        if last < 0 and view.num_output_tokens == 0:
            return                                  # not prefilled yet: prompt-only
        for j in range(max(0, last + self.every), generated + 1, self.every):
            self.observe(rid, {f"bin{i}": float(p) for i, p in enumerate(probs[j])}, j)
            self.observed_at[rid] = j

    def initial(self, view: RequestView) -> float:
        self._catch_up(view)
        return super().initial(view)

    def remaining(self, view: RequestView) -> float:
        self._catch_up(view)
        return super().remaining(view)
