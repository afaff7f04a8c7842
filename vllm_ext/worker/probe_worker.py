"""`ProbeWorker`: the platform's vLLM worker plus hidden-state probes (the prediction channel).

Loaded with ``--worker-cls vllm_ext.worker.probe_worker.ProbeWorker``; it subclasses
``CPUWorker`` on CPU and the GPU ``Worker`` elsewhere. After the model is loaded it registers a
forward hook on each decoder layer a probe reads; the hook only copies the residual stream
(``hidden + residual`` for Llama/Mixtral-style layers) into a preallocated buffer, so it is
tensor-only and is traced into compiled graphs as well as eager ones. After each forward step
the worker takes the last scheduled token's row of every request, runs the probes (every
``probe_every`` steps, and always for a request that has no prediction yet, i.e. at the end of
its prefill; a request whose prompt is prefilled in chunks is skipped, by probes and capture,
until the step that computes its last prompt token) and
  * in capture mode (``capture_layers``), records those layers' rows per request and step for
    probe training (drained with ``collective_rpc("ext_drain_capture")``);
  * attaches ``{req_id: {name: value}}`` to the step's output as ``probe_values`` for the
    scheduler (``PredictiveScheduler.update_from_output``);
  * keeps the latest values in a `PredictionStore` that the server reads over
    ``collective_rpc("ext_get_predictions")``.
With no probe loaded every step is the base worker's. A probe that fails to load or to run is
logged once and disabled; requests go on without predictions. With ``live_config`` the probes a
live switch may need are loaded at start (hooks must exist before compilation) and run only
while the active config reads them (`ExtConfig.needs_probes`); ``ext_apply_config`` changes the
cadence and that switch between steps, ``ext_stats`` counts probe runs and their time.
"""
from __future__ import annotations

import time

import torch
from vllm.logger import init_logger
from vllm.platforms import current_platform

from vllm_ext.config import ExtConfig
from vllm_ext.probes.base import (Probe, ProbeError, load_probe, model_fingerprint,
                                  resolve_probe_paths)
from vllm_ext.worker.channel import CaptureLog, PredictionStore

logger = init_logger(__name__)

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as _BaseWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as _BaseWorker


def residual_stream(output) -> torch.Tensor:
    """A decoder layer's output as the residual stream (vLLM layers return (hidden, residual))."""
    if isinstance(output, tuple):
        hidden, residual = output[0], output[1]
        return hidden if residual is None else hidden + residual
    return output


def decoder_layers(model: torch.nn.Module):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ProbeError(f"{type(model).__name__} has no .model.layers to hook")
    return layers


class ProbeWorker(_BaseWorker):
    ext_probes: list[Probe] = []
    ext_probe_runs, ext_probe_rows, ext_probe_seconds = 0, 0, 0.0  # counters for /metrics

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        self.ext_config = ExtConfig.from_vllm_config(self.vllm_config)
        self.ext_store = PredictionStore(keep_history=self.ext_config.probe_history)
        self.ext_step = 0
        self.ext_awaiting: set[str] = set()  # started, no prediction yet (probe at prefill end)
        self.ext_prefill: dict[str, int] = {}  # chunked prefill: prompt tokens still to compute
        self.ext_partial: set[str] = set()     # this step's requests in the middle of a prefill
        self.ext_probes, self.ext_buffers = [], {}
        self.ext_capture = CaptureLog(self.ext_config.capture_layers)
        try:
            self._load_probes()
            self._hook_layers({p.layer for p in self.ext_probes} | set(self.ext_capture.layers))
        except Exception as exc:  # never take the engine down for a probe
            logger.warning("vllm-ext: probes disabled, policies fall back to baseline: %s", exc)
            self.ext_probes, self.ext_buffers = [], {}
            self.ext_capture = CaptureLog(())

    def compile_or_warm_up_model(self, *args, **kwargs):
        """vLLM's warm-up and compile passes (dummy batches) run the MoE routers too: zero the
        expert-load counters and LASER's load window afterwards, as vLLM resets its seed
        there, so neither the figures nor the first real routing decisions see them."""
        result = super().compile_or_warm_up_model(*args, **kwargs)
        from vllm_ext.moe.router import expert_loads

        for load in expert_loads(self.model_runner.get_model()).values():
            load.reset()
        return result

    def _load_probes(self) -> None:
        hf_config, path = self.vllm_config.model_config.hf_config, self.vllm_config.model_config.model
        paths = resolve_probe_paths(self.ext_config, hf_config, path)
        if not paths:
            return
        fingerprint = model_fingerprint(hf_config, path)
        self.ext_probes = [load_probe(p, fingerprint) for p in paths]
        logger.info("vllm-ext ProbeWorker: %d probe(s) on layer(s) %s, every %d step(s)",
                    len(self.ext_probes), sorted({p.layer for p in self.ext_probes}),
                    self.ext_config.probe_every)

    def _hook_layers(self, wanted: set[int]) -> None:
        if not wanted:
            return
        layers = decoder_layers(self.model_runner.get_model())
        hidden = self.vllm_config.model_config.get_hidden_size()
        rows = self.vllm_config.scheduler_config.max_num_batched_tokens
        for layer in sorted(wanted):
            if not 0 <= layer < len(layers):
                raise ProbeError(f"probe layer {layer} out of range (model has {len(layers)})")
            buf = torch.zeros(rows, hidden, dtype=torch.float32, device=self.device)
            layers[layer].register_forward_hook(_make_capture_hook(buf))
            self.ext_buffers[layer] = buf

    def execute_model(self, scheduler_output):
        if not self.ext_buffers:
            return super().execute_model(scheduler_output)
        probing = self.ext_config.needs_probes()
        for new in scheduler_output.scheduled_new_reqs:
            params = new.sampling_params
            self.ext_store.start(new.req_id, params.extra_args if params else None)
            if probing:  # probed in this step (end of its first chunk), so never left behind;
                self.ext_awaiting.add(new.req_id)  # after a live switch: at the next k-th step
        self.ext_awaiting.difference_update(scheduler_output.finished_req_ids)
        self.ext_partial = self._track_prefill(scheduler_output)
        output = super().execute_model(scheduler_output)
        self.ext_pending = None
        if scheduler_output.total_num_scheduled_tokens > 0:
            try:
                if self.ext_capture.layers:
                    self._capture()
                if self.ext_probes and probing:
                    self.ext_pending = self._run_probes()
            except Exception:
                logger.exception("vllm-ext: probe failed; disabling probes")
                self.ext_probes = []
        return self._attach(output)

    def _track_prefill(self, scheduler_output) -> set[str]:
        """The requests of this step whose prefill it does not finish (a chunk of a longer
        prompt): their last row is a prompt token in the middle of the prompt, not the end of
        prefill, and vLLM discards the token sampled there. A request preempted in the middle of
        its prefill is forgotten here (its recompute on resume is not tracked)."""
        prefill, sched = self.ext_prefill, scheduler_output.num_scheduled_tokens
        for req_id in (scheduler_output.finished_req_ids
                       | (getattr(scheduler_output, "preempted_req_ids", None) or set())):
            prefill.pop(req_id, None)
        for req_id in [r for r in prefill if r in sched]:
            prefill[req_id] -= sched[req_id]
            if prefill[req_id] <= 0:
                del prefill[req_id]
        for new in scheduler_output.scheduled_new_reqs:
            prompt = new.prompt_token_ids
            if prompt is None:
                prompt = getattr(new, "prompt_embeds", None)
            left = (0 if prompt is None else len(prompt)) - new.num_computed_tokens \
                - sched.get(new.req_id, 0)
            if left > 0:
                prefill[new.req_id] = left
        return {r for r in prefill if r in sched}

    def _last_token_rows(self) -> tuple[list[str], torch.Tensor]:
        """Each scheduled request's last row this step, except requests in the middle of a
        chunked prefill (`_track_prefill`)."""
        runner = self.model_runner
        num_reqs = runner.input_batch.num_reqs
        rows = runner.query_start_loc.cpu[1:num_reqs + 1].long() - 1
        req_ids = list(runner.input_batch.req_ids[:num_reqs])
        partial = getattr(self, "ext_partial", ())
        if partial and any(r in partial for r in req_ids):
            keep = [i for i, r in enumerate(req_ids) if r not in partial]
            req_ids, rows = [req_ids[i] for i in keep], rows[keep]
        return req_ids, rows

    def _capture(self) -> None:
        req_ids, rows = self._last_token_rows()
        if not req_ids:
            return
        stacked = torch.stack([self.ext_buffers[layer][rows.to(self.device)]
                               for layer in self.ext_capture.layers], dim=1)
        self.ext_capture.add(req_ids, stacked.to(torch.float16).cpu())

    def ext_drain_capture(self) -> dict:
        """Capture mode (data collection): every recorded row since the last call, keyed by
        the request's ``ext_tag`` when it has one (engine ids carry random suffixes)."""
        out = self.ext_capture.drain()
        tags = {r: e.tag for r, e in self.ext_store.entries.items() if e.tag}
        out["rows"] = {tags.get(r, r): v for r, v in out["rows"].items()}
        return out

    def sample_tokens(self, *args, **kwargs):
        return self._attach(super().sample_tokens(*args, **kwargs))

    def _attach(self, output):
        """Hand this step's probe values to the scheduler with the step's output. The probes
        run here, in the step, on every platform (on a GPU their kernels stay on the forward's
        stream), so one code path serves both and nothing runs in vLLM's async output thread,
        which on CPU shares the worker's one core and the GIL with the forward. (Deferring the
        CPU probe to that thread was tried; it did not measure better: docs/trail.md.)"""
        pending = getattr(self, "ext_pending", None)
        if pending is None or output is None:
            return output
        if not hasattr(output, "sampled_token_ids") and not hasattr(output, "get_output"):
            return output  # no output this call (execute_model before sampling): keep pending
        self.ext_pending = None
        values = self._evaluate(pending)
        if hasattr(output, "sampled_token_ids"):
            output.probe_values = values
            return output
        inner_get = output.get_output

        def get_output():
            result = inner_get()
            result.probe_values = values
            return result
        output.get_output = get_output
        return output

    def _evaluate(self, pending) -> dict[str, dict[str, float]]:
        req_ids, inputs = pending
        start = time.perf_counter()
        try:
            results: dict[str, dict[str, float]] = {r: {} for r in req_ids}
            for probe in self.ext_probes:
                out = probe(inputs[probe.layer]).cpu().tolist()
                for req_id, row in zip(req_ids, out):
                    results[req_id].update(zip(probe.output_names, row))
        except Exception:
            logger.exception("vllm-ext: probe failed; disabling probes")
            self.ext_probes = []
            return {}
        self.ext_probe_runs += 1
        self.ext_probe_rows += len(req_ids)
        self.ext_probe_seconds += time.perf_counter() - start
        for req_id, values in results.items():
            self.ext_store.record(req_id, values)
        return results

    def _run_probes(self) -> tuple[list[str], dict[int, torch.Tensor]] | None:
        """Which requests to probe this step: all of them on every k-th step, in between only
        requests that just started (their initial prediction). Returns their rows of the hook
        buffers for `_evaluate`; None on a step with nothing to probe, before touching a
        tensor, so between probe steps the worker's only cost is the layer hook's copy."""
        self.ext_step += 1
        refresh_all = self.ext_step % self.ext_config.probe_every == 0
        if not refresh_all and not self.ext_awaiting:
            return None
        req_ids, rows = self._last_token_rows()
        if not req_ids:
            return None
        if not refresh_all:
            pick = [i for i, r in enumerate(req_ids) if r in self.ext_awaiting]
            if not pick:
                return None
            req_ids = [req_ids[i] for i in pick]
            rows = rows[pick]
        rows = rows.to(self.device)
        self.ext_awaiting.difference_update(req_ids)
        return req_ids, {layer: self.ext_buffers[layer][rows]
                         for layer in {p.layer for p in self.ext_probes}}

    # ---- RPC for the server (collective_rpc) -------------------------------------------------
    def ext_apply_config(self, live: dict) -> dict:
        """Live settings from the admin route, applied between two steps."""
        self.ext_config = self.ext_config.with_live_changes(live)
        return {"probe_every": self.ext_config.probe_every,
                "probes_running": bool(self.ext_probes) and self.ext_config.needs_probes()}

    def ext_get_state(self) -> dict:
        """Per-request structures (zero once the engine drains) and the bounded LRU of
        predictions the server reads after a request ends (at most its capacity)."""
        store = getattr(self, "ext_store", None)
        capture = getattr(self, "ext_capture", None)
        return {"per_request": {"awaiting_first_probe": len(getattr(self, "ext_awaiting", ())),
                                "prefill_in_progress": len(getattr(self, "ext_prefill", ())),
                                "capture_rows": len(capture.rows) if capture else 0},
                "prediction_entries": len(store.entries) if store else 0,
                "prediction_capacity": store.capacity if store else 0}

    def ext_stats(self) -> dict:
        return {"probe_runs": self.ext_probe_runs, "probe_rows": self.ext_probe_rows,
                "probe_seconds": self.ext_probe_seconds, "probes_loaded": len(self.ext_probes)}

    def ext_probe_meta(self, kind: str) -> dict | None:
        """The ``meta`` of the loaded probe of `kind` (e.g. the branch runner reads the
        correctness probe's confidence combiner; its training report left out), None when
        none is loaded."""
        probe = next((p for p in getattr(self, "ext_probes", ()) if p.kind == kind), None)
        return None if probe is None else {k: v for k, v in probe.meta.items() if k != "report"}

    def ext_get_predictions(self, tag: str | None = None, req_ids: list[str] | None = None,
                            tag_prefix: str | None = None):
        store = getattr(self, "ext_store", None)
        return store.query(tag=tag, req_ids=req_ids, tag_prefix=tag_prefix) if store else {}

    def ext_expert_load(self, reset: bool = False, ep_devices: int | None = None,
                        placement: str = "linear") -> dict:
        """Expert-load report of the model's MoE layers (`vllm_ext.moe.load_stats`); ``reset``
        zeroes the counters after reading. No layers when the engine routes with ``topk``
        without ``moe_track_load`` (vLLM's router untouched, nothing counted)."""
        from vllm_ext.moe.load_stats import load_report
        from vllm_ext.moe.router import expert_loads

        loads = expert_loads(self.model_runner.get_model())
        devices = ep_devices or ExtConfig.from_vllm_config(self.vllm_config).moe_ep_devices
        report = load_report({name: load.snapshot() for name, load in loads.items()},
                             devices, placement)
        if reset:
            for load in loads.values():
                load.reset()
        return report


def _make_capture_hook(buffer: torch.Tensor):
    def hook(module, inputs, output):
        stream = residual_stream(output)
        buffer[: stream.shape[0]].copy_(stream)
    return hook
