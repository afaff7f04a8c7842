"""Fit the token-confidence combiner of DUCHESS's branch score (`vllm_ext.branches.confidence`).

Paper: DUCHESS (arXiv 2509.24957) with token confidence (DeepConf, Fu et al. 2025). Rule: on
the decode probe rounds (j = i, 2i, ...) of the *validation* prompts, which the hidden-state
probe was not trained on, a logistic regression over the features of
`vllm_ext.branches.confidence` (the probe's logit at row j and at the end of prefill, row 0;
lowest / mean / lowest-window sampled-token logprob of the first j tokens; log j) is fitted
by `probes.correctness.train_linear` (inputs standardised, weights folded back to raw units).
Every figure reported is on the test prompts: the probe alone, confidence alone (the same fit
without the probe inputs) and the combination, pooled over rounds, at the first round and
within prompt (`probes.correctness.evaluate`).
"""
from __future__ import annotations

import numpy as np
import torch

from vllm_ext.branches.confidence import FEATURES, Combiner, confidence_of
from vllm_ext.probes.correctness import (BranchDataset, evaluate, probe_rows, split_by_prompt,
                                         train_linear)


def feature_matrix(data: BranchDataset, rows, probe, layer_pos: int) -> np.ndarray:
    """[M, len(FEATURES)] for decode rows: the probe's value at the row and at the end of
    prefill, and the branch's confidence after the first `pos` sampled tokens."""
    p_row = probe(rows.x).squeeze(-1).numpy()
    prefill = {}
    for b in np.unique(rows.branch).tolist():
        if data.positions[b][0] != 0:
            raise ValueError(f"branch {b} has no end-of-prefill row")
        prefill[b] = float(probe(data.hidden[b][:1, layer_pos, :]).item())
    feats = [confidence_of(data.logprobs[b], int(pos)).features(p, prefill[b])
             for b, pos, p in zip(rows.branch.tolist(), rows.pos, p_row)]
    return np.array([[f[name] for name in FEATURES] for f in feats])


def _fit(x: np.ndarray, y: np.ndarray, names: list[str], c: float = 1.0) -> Combiner:
    """The probe's own logistic trainer (C fixed), its raw-unit weights as a `Combiner`."""
    module = train_linear(torch.as_tensor(x, dtype=torch.float32), y, c=c)
    weights = module.weight.detach()[0].double().numpy()
    return Combiner(float(module.bias.detach()[0]),
                    {name: float(v) for name, v in zip(names, weights)})


def _scores(comb: Combiner, x: np.ndarray, names: list[str]) -> np.ndarray:
    w = np.array([comb.weights.get(n, 0.0) for n in names])
    return comb.bias + x @ w


def fit_confidence(data: BranchDataset, probe, every: int = 16, seed: int = 0,
                   log=print) -> tuple[Combiner | None, dict]:
    """The combiner for `probe` (trained on `data`'s training prompts) and its test report;
    (None, reason) when the dataset has no sampled-token logprobs."""
    if len(data.logprobs) != len(data):
        return None, {"skipped": "dataset has no sampled-token logprobs (collected before "
                                 "they were recorded)"}
    split = split_by_prompt(data.prompt, seed=seed)
    layer_pos = data.layers.index(probe.layer)
    sides = {}
    for name in ("val", "test"):
        rows = probe_rows(data, getattr(split, name), layer_pos, every, prefill=False)
        sides[name] = (rows, feature_matrix(data, rows, probe, layer_pos))
    (va, xv), (te, xt) = sides["val"], sides["test"]
    names = list(FEATURES)
    combined = _fit(xv, va.y, names)
    tokens = [i for i, n in enumerate(names) if not n.endswith("_logit")]  # no probe input
    conf_only = _fit(xv[:, tokens], va.y, [names[i] for i in tokens])
    report = {"fitted_on": "validation prompts, decode rounds", "weights": combined.to_meta(),
              "test": {"probe": evaluate(xt[:, names.index("probe_logit")], te, every),
                       "confidence": evaluate(_scores(conf_only, xt[:, tokens],
                                                      [names[i] for i in tokens]), te, every),
                       "combined": evaluate(_scores(combined, xt, names), te, every)}}
    for what, r in report["test"].items():
        log(f"test {what:<10}: AUROC {r['auroc']:.3f} (first round {r['auroc_first_round']:.3f},"
            f" within prompt {r['auroc_within_prompt']:.3f})")
    return combined, report
