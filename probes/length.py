"""TRAIL's length probe: training, layer sweep, and the MAE comparison with prompt-only.

Target: tokens still to generate at each step (row j of a request with N tokens: N - j),
classified into K bins (equal-width or quantile) with cross-entropy; the prediction is the
expected value over bin midpoints. Architectures: `linear` and the paper's MLP
``Linear(d,512)-ReLU-Linear(512,K)``. Inputs are standardised during training and the
standardisation is folded into the first layer, so the saved probe is a plain module. The
split is by request. Baselines on the same validation rows, counted down per token:
the prompt-only ridge (`PromptModel`) and the initial (end-of-prefill) probe prediction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vllm_ext.probes.base import Probe, build_module
from vllm_ext.probes.collect import LengthDataset
from vllm_ext.sched.trail import LengthBins, PromptModel, RemainingTracker


@dataclass
class Split:
    train: np.ndarray
    val: np.ndarray


def split_requests(n: int, val_frac: float = 0.2, seed: int = 0) -> Split:
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(n * val_frac))
    return Split(train=np.sort(order[n_val:]), val=np.sort(order[:n_val]))


def rows(data: LengthDataset, reqs: np.ndarray, layer_pos: int):
    x = torch.cat([data.hidden[i][:, layer_pos, :].float() for i in reqs])
    y = np.concatenate([data.output_len[i] - np.arange(data.hidden[i].shape[0]) for i in reqs])
    return x, y.astype(float)


def train_probe_module(x: torch.Tensor, bin_idx: np.ndarray, k: int, arch: str = "mlp",
                       epochs: int = 15, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-4)
    xs = (x - mean) / std
    target = torch.as_tensor(bin_idx, dtype=torch.long)
    module = build_module(arch, x.shape[1], k)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        perm = torch.randperm(xs.shape[0])
        for start in range(0, xs.shape[0], 1024):
            idx = perm[start:start + 1024]
            loss = nn.functional.cross_entropy(module(xs[idx]), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    first = module if isinstance(module, nn.Linear) else module[0]
    with torch.no_grad():  # fold (x - mean) / std into the first layer
        first.bias -= first.weight @ (mean / std)
        first.weight /= std
    return module.eval()


def expected_remaining(module: nn.Module, x: torch.Tensor, bins: LengthBins) -> np.ndarray:
    with torch.no_grad():
        p = module(x).softmax(-1).numpy()
    return p @ bins.midpoints


def fit_prompt_model(data: LengthDataset, reqs: np.ndarray, alpha: float = 1.0) -> PromptModel:
    from sklearn.linear_model import Ridge

    feats = np.stack([PromptModel.features(data.prompt_ids[i]) for i in reqs])
    target = np.array([data.output_len[i] for i in reqs], dtype=float)
    ridge = Ridge(alpha=alpha, fit_intercept=False).fit(feats, target)
    return PromptModel(tuple(float(c) for c in ridge.coef_))


def mae_table(data: LengthDataset, reqs, layer_pos: int, module, bins: LengthBins,
              prompt_model: PromptModel, every: int = 8) -> dict[str, float]:
    """MAE in tokens over every validation (request, step) row, per predictor."""
    errs = {"prompt_only": [], "initial_probe": [], "per_step_probe": [],
            f"trail_k{every}_smoothed": [], f"trail_k{every}_raw": []}
    for i in reqs:
        h = data.hidden[i][:, layer_pos, :].float()
        n = data.output_len[i]
        truth = n - np.arange(h.shape[0])
        with torch.no_grad():
            probs = module(h).softmax(-1).numpy()
        step_pred = probs @ bins.midpoints
        count = np.arange(h.shape[0])
        errs["prompt_only"].append(
            np.abs(np.maximum(1, prompt_model.predict(data.prompt_ids[i]) - count) - truth))
        errs["initial_probe"].append(np.abs(np.maximum(1, step_pred[0] - count) - truth))
        errs["per_step_probe"].append(np.abs(step_pred - truth))
        for smooth in (True, False):
            tracker, pred = RemainingTracker(bins, smooth), []
            for j in range(h.shape[0]):
                if j % every == 0:
                    tracker.observe(probs[j], j)
                pred.append(tracker.remaining(j))
            key = f"trail_k{every}_{'smoothed' if smooth else 'raw'}"
            errs[key].append(np.abs(np.array(pred) - truth))
    return {k: float(np.concatenate(v).mean()) for k, v in errs.items()}


def train_length_probe(data: LengthDataset, fingerprint: str, arch: str = "mlp", k: int = 10,
                       bin_mode: str = "quantile", every: int = 8, seed: int = 0,
                       log=print) -> tuple[Probe, dict]:
    split = split_requests(len(data.output_len), seed=seed)
    prompt_model = fit_prompt_model(data, split.train)
    _, y_train = rows(data, split.train, 0)
    bins = LengthBins.make(y_train, k, bin_mode)
    sweep, best = {}, None
    for pos, layer in enumerate(data.layers):
        x_tr, y_tr = rows(data, split.train, pos)
        module = train_probe_module(x_tr, bins.index(y_tr), len(bins.edges) - 1, arch, seed=seed)
        x_va, y_va = rows(data, split.val, pos)
        mae = float(np.abs(expected_remaining(module, x_va, bins) - y_va).mean())
        sweep[layer] = mae
        log(f"layer {layer}: validation MAE {mae:.1f} tokens ({arch})")
        if best is None or mae < best[0]:
            best = (mae, pos, layer, module)
    _, pos, layer, module = best
    table = mae_table(data, split.val, pos, module, bins, prompt_model, every)
    report = {"layer_sweep_mae": sweep, "best_layer": layer, "mae": table,
              "bins": list(bins.edges), "n_train_requests": len(split.train),
              "n_val_requests": len(split.val)}
    probe = Probe(kind="length", layer=layer, output_names=[f"bin{i}" for i in range(len(bins.edges) - 1)],
                  module=module, fingerprint=fingerprint, arch=arch,
                  meta={"output": "softmax", "bin_edges": list(bins.edges),
                        "prompt_model": {"coef": list(prompt_model.coef),
                                         "buckets": prompt_model.buckets}, "report": report})
    return probe, report
