"""DUCHESS's branch-correctness probe (arXiv 2509.24957): P(this branch's final answer is right)
from one layer's hidden state, read every i generated tokens (default i = 16).

Rule. Each prompt is sampled as several independent branches (temperature ~1). For a branch
with N output tokens, the ProbeWorker's capture row j (j tokens generated so far; row 0 = the
last prompt token at the end of prefill) of layer L is one example when j % i == 0; its label
is the branch's outcome, `testbed.tasks.check_answer` on the branch's whole completion, so
every row of a branch carries the same label. Prompts (not rows, not branches) are split into
train / validation / test: all branches of a prompt land on one side, so a held-out figure
never sees a sibling of its branch. Per layer, a logistic regression (scikit-learn, C picked on
validation) and a small MLP ``Linear(d, 64)-ReLU-Linear(64, 1)`` (torch, BCE, epoch picked on
validation) are trained on the training rows; the (arch, layer) with the best validation AUROC
over the decode probe rounds (j = i, 2i, ...) is kept, and every figure reported is on the test
prompts. AUROC is reported pooled over the rounds, per position bucket ([0, i), [i, 2i), ...:
one bucket per probe round at the default cadence) and within prompt (mean over test prompts
whose branches disagree: what a branch orchestrator ranks on). The end-of-prefill row is the
same for all branches of a prompt, so its AUROC measures prompt difficulty only.

The saved probe (`probes.base` format, kind ``correctness``, output ``p_correct`` through a
sigmoid, the inputs' standardisation folded into the first layer) is bound to the model's
fingerprint and loads through the same path as the length probe. Collection runs through vLLM
with the ProbeWorker in capture mode (`probes.collect.collect_branches`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vllm_ext.probes.base import Probe, build_module

TOOL_FREE_KINDS = ("add", "sub", "mul", "gcd", "sort", "count")
OUTPUT_NAME = "p_correct"


# ----------------------------------------------------------------------------- data

@dataclass
class BranchDataset:
    layers: list[int]
    hidden: list[torch.Tensor] = field(default_factory=list)    # per branch: [R, n_layers, H] fp16
    positions: list[np.ndarray] = field(default_factory=list)   # per branch: [R] tokens generated
    correct: list[bool] = field(default_factory=list)           # per branch: final answer right
    prompt: list[int] = field(default_factory=list)             # per branch: its prompt's index
    output_len: list[int] = field(default_factory=list)         # per branch: N
    meta: list[dict] = field(default_factory=list)              # per branch: kind, answer, got...
    logprobs: list[np.ndarray] = field(default_factory=list)    # per branch: [N] sampled-token lp

    def __len__(self) -> int:
        return len(self.correct)

    def add(self, hidden, positions, correct: bool, prompt: int, output_len: int,
            meta: dict | None = None, logprobs=None) -> None:
        if hidden.shape[0] != len(positions):
            raise ValueError(f"{hidden.shape[0]} rows for {len(positions)} positions")
        self.hidden.append(hidden)
        self.positions.append(np.asarray(positions, dtype=np.int64))
        self.correct.append(bool(correct))
        self.prompt.append(int(prompt))
        self.output_len.append(int(output_len))
        self.meta.append(dict(meta or {}))
        if logprobs is not None:
            self.logprobs.append(np.asarray(logprobs, dtype=np.float32))

    def save(self, path: str | Path) -> None:
        torch.save(self.__dict__, path)

    @classmethod
    def load(cls, path: str | Path) -> "BranchDataset":
        return cls(**torch.load(path, weights_only=False))

    def summary(self) -> dict:
        """Accuracy of one sample, of the majority vote over a prompt's branches, and how many
        prompts have branches that disagree (the room a branch orchestrator has)."""
        by_prompt: dict[int, list[int]] = {}
        for i, p in enumerate(self.prompt):
            by_prompt.setdefault(p, []).append(i)
        mixed = sum(0 < sum(self.correct[i] for i in b) < len(b) for b in by_prompt.values())
        vote_right = 0
        for branches in by_prompt.values():
            votes: dict = {}
            for i in branches:
                got = self.meta[i].get("got")
                if got is not None:
                    votes.setdefault(got, []).append(self.correct[i])
            if votes:
                best = max(votes.values(), key=len)
                vote_right += bool(best[0])
        return {"prompts": len(by_prompt), "branches": len(self),
                "branch_accuracy": float(np.mean(self.correct)) if len(self) else float("nan"),
                "majority_vote_accuracy": vote_right / max(1, len(by_prompt)),
                "prompts_with_disagreeing_branches": mixed,
                "mean_output_tokens": float(np.mean(self.output_len)) if len(self) else 0.0}


@dataclass
class PromptSplit:
    train: np.ndarray   # branch indices
    val: np.ndarray
    test: np.ndarray


def split_by_prompt(prompt: list[int] | np.ndarray, val_frac: float = 0.2,
                    test_frac: float = 0.2, seed: int = 0) -> PromptSplit:
    """Branch indices of disjoint prompt sets: every branch of a prompt is on one side."""
    prompt = np.asarray(prompt)
    uniq = np.unique(prompt)
    order = np.random.default_rng(seed).permutation(uniq)
    n_val, n_test = max(1, int(len(uniq) * val_frac)), max(1, int(len(uniq) * test_frac))
    if n_val + n_test >= len(uniq):
        raise ValueError(f"{len(uniq)} prompts are too few for a train/val/test split")
    test_p, val_p = set(order[:n_test].tolist()), set(order[n_test:n_test + n_val].tolist())
    side = np.array([2 if p in test_p else 1 if p in val_p else 0 for p in prompt.tolist()])
    return PromptSplit(*(np.flatnonzero(side == k) for k in range(3)))


@dataclass
class Rows:
    x: torch.Tensor       # [M, H] float32
    y: np.ndarray         # [M] 0/1
    pos: np.ndarray       # [M] tokens generated before the row
    prompt: np.ndarray    # [M]
    branch: np.ndarray    # [M]


def probe_rows(data: BranchDataset, branches, layer_pos: int, every: int = 16,
               prefill: bool = True) -> Rows:
    """The probe's examples: rows at positions j % every == 0 (j = 0 only if `prefill`)."""
    xs, ys, ps, gs, bs = [], [], [], [], []
    for b in branches:
        pos = data.positions[b]
        keep = (pos % every == 0) & ((pos > 0) | prefill)
        if not keep.any():
            continue
        xs.append(data.hidden[b][torch.from_numpy(np.flatnonzero(keep)), layer_pos, :].float())
        n = int(keep.sum())
        ys.append(np.full(n, int(data.correct[b])))
        ps.append(pos[keep])
        gs.append(np.full(n, data.prompt[b]))
        bs.append(np.full(n, b))
    if not xs:
        raise ValueError("no rows at this cadence")
    return Rows(torch.cat(xs), np.concatenate(ys), np.concatenate(ps), np.concatenate(gs),
                np.concatenate(bs))


# ----------------------------------------------------------------------------- metrics

def auroc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN when the
    labels are all one class."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average rank over each run of ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bucket_label(pos: int, width: int, last: int) -> str:
    lo = min(pos // width * width, last)
    return f">={last}" if lo >= last else f"{lo}-{lo + width}"


def evaluate(scores: np.ndarray, rows: Rows, every: int, bucket: int | None = None,
             last_bucket: int = 192) -> dict:
    """AUROC of `scores` on `rows`: over the decode probe rounds (j >= every), at the first
    round (j = every), on the end-of-prefill row (j = 0), per position bucket and within
    prompt (mean over prompts whose branches disagree, decode rounds pooled)."""
    bucket = bucket or every
    decode = rows.pos > 0
    out = {"auroc": auroc(scores[decode], rows.y[decode]),
           "auroc_first_round": auroc(scores[rows.pos == every], rows.y[rows.pos == every]),
           "auroc_prefill_row": auroc(scores[rows.pos == 0], rows.y[rows.pos == 0]),
           "rows": int(decode.sum()), "positive_rate": float(rows.y[decode].mean())
           if decode.any() else float("nan")}
    by_bucket: dict[str, dict] = {}
    labels = np.array([bucket_label(int(p), bucket, last_bucket) for p in rows.pos])
    for name in sorted(set(labels.tolist()), key=lambda s: int(s.lstrip(">=").split("-")[0])):
        m = labels == name
        by_bucket[name] = {"auroc": auroc(scores[m], rows.y[m]), "rows": int(m.sum()),
                           "positive_rate": float(rows.y[m].mean())}
    out["by_position"] = by_bucket
    first = {int(b): sc for b, sc in zip(rows.branch[rows.pos == 0], scores[rows.pos == 0])}
    if decode.any() and all(int(b) in first for b in rows.branch[decode]):
        # the prefill-row score held for the whole branch: what prompt difficulty alone gives
        held = np.array([first[int(b)] for b in rows.branch[decode]])
        out["auroc_prefill_score_held"] = auroc(held, rows.y[decode])
    within = []
    for p in np.unique(rows.prompt[decode]):
        m = decode & (rows.prompt == p)
        a = auroc(scores[m], rows.y[m])
        if not np.isnan(a):
            within.append(a)
    out["auroc_within_prompt"] = float(np.mean(within)) if within else float("nan")
    out["prompts_with_disagreeing_branches"] = len(within)
    return out


# ----------------------------------------------------------------------------- training

def _standardise(x: torch.Tensor):
    return x.mean(0), x.std(0).clamp_min(1e-4)


def _fold(module: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> nn.Module:
    """Make `module(x)` equal to what it computed on ``(x - mean) / std``."""
    first = module if isinstance(module, nn.Linear) else module[0]
    with torch.no_grad():
        first.bias -= first.weight @ (mean / std)
        first.weight /= std
    return module.eval()


def _logits(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return module(x).squeeze(-1).numpy()


def train_linear(x: torch.Tensor, y: np.ndarray, x_val=None, y_val=None,
                 cs=(0.001, 0.01, 0.1, 1.0), c: float = 0.1) -> nn.Module:
    """Logistic regression on standardised inputs (C picked from `cs` by validation AUROC
    when validation rows are given, else `c`), returned as a ``nn.Linear(d, 1)`` on raw
    inputs."""
    from sklearn.linear_model import LogisticRegression

    mean, std = _standardise(x)
    xs = ((x - mean) / std).numpy()
    best = None
    for cand in (cs if x_val is not None else (c,)):
        clf = LogisticRegression(C=cand, max_iter=2000).fit(xs, y)
        score = 0.0 if x_val is None else auroc(
            clf.decision_function(((x_val - mean) / std).numpy()), y_val)
        if best is None or score > best[0]:
            best = (score, clf)
    clf = best[1]
    module = nn.Linear(x.shape[1], 1)
    with torch.no_grad():
        module.weight.copy_(torch.as_tensor(clf.coef_, dtype=torch.float32))
        module.bias.copy_(torch.as_tensor(clf.intercept_, dtype=torch.float32))
    return _fold(module, mean, std)


def train_mlp(x: torch.Tensor, y: np.ndarray, x_val=None, y_val=None, hidden: int = 64,
              epochs: int = 30, lr: float = 1e-3, weight_decay: float = 1e-2,
              seed: int = 0) -> nn.Module:
    """``Linear(d, hidden)-ReLU-Linear(hidden, 1)`` with BCE; the epoch with the best
    validation AUROC is kept when validation rows are given."""
    torch.manual_seed(seed)
    mean, std = _standardise(x)
    xs = (x - mean) / std
    xv = None if x_val is None else (x_val - mean) / std
    target = torch.as_tensor(y, dtype=torch.float32)
    module = build_module("mlp", x.shape[1], 1, hidden)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    best = None
    for _ in range(epochs):
        module.train()
        perm = torch.randperm(xs.shape[0])
        for start in range(0, xs.shape[0], 256):
            idx = perm[start:start + 256]
            loss = nn.functional.binary_cross_entropy_with_logits(
                module(xs[idx]).squeeze(-1), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if xv is not None:
            module.eval()
            score = auroc(_logits(module, xv), y_val)
            if best is None or score > best[0]:
                best = (score, {k: v.clone() for k, v in module.state_dict().items()})
    if best is not None:
        module.load_state_dict(best[1])
    return _fold(module, mean, std)


TRAINERS = {"linear": train_linear, "mlp": train_mlp}


def train_correctness_probe(data: BranchDataset, fingerprint: str, every: int = 16,
                            archs=("linear", "mlp"), seed: int = 0, prefill: bool = True,
                            mlp_epochs: int = 30, log=print) -> tuple[Probe, dict]:
    """Layer sweep over `data.layers` for each arch in `archs`; keeps the best by validation
    AUROC (decode rounds pooled) and reports everything on the held-out test prompts."""
    split = split_by_prompt(data.prompt, seed=seed)
    sweep: dict[str, dict] = {a: {} for a in archs}
    best = None
    for pos, layer in enumerate(data.layers):
        tr = probe_rows(data, split.train, pos, every, prefill)
        va = probe_rows(data, split.val, pos, every, prefill)
        te = probe_rows(data, split.test, pos, every, prefill)
        for arch in archs:
            extra = {"epochs": mlp_epochs, "seed": seed} if arch == "mlp" else {}
            module = TRAINERS[arch](tr.x, tr.y, va.x, va.y, **extra)
            val = evaluate(_logits(module, va.x), va, every)
            test = evaluate(_logits(module, te.x), te, every)
            sweep[arch][layer] = {"val_auroc": val["auroc"], "test": test}
            log(f"layer {layer} {arch:<6}: val AUROC {val['auroc']:.3f}, test AUROC "
                f"{test['auroc']:.3f} (first round {test['auroc_first_round']:.3f}, within "
                f"prompt {test['auroc_within_prompt']:.3f})")
            score = -1.0 if np.isnan(val["auroc"]) else val["auroc"]
            if best is None or score > best[0]:
                best = (score, arch, layer, module)
    _, arch, layer, module = best
    n_prompts = {k: len(set(np.asarray(data.prompt)[getattr(split, k)].tolist()))
                 for k in ("train", "val", "test")}
    report = {"every": every, "dataset": data.summary(), "split_prompts": n_prompts,
              "baseline_kind_difficulty_auroc": kind_difficulty_baseline(data, split, every),
              "split_branches": {k: len(getattr(split, k)) for k in ("train", "val", "test")},
              "sweep": sweep, "best_arch": arch, "best_layer": layer,
              "best_val_auroc": sweep[arch][layer]["val_auroc"],
              "best_test": sweep[arch][layer]["test"]}
    probe = Probe(kind="correctness", layer=layer, output_names=[OUTPUT_NAME], module=module,
                  fingerprint=fingerprint, arch=arch,
                  meta={"output": "sigmoid", "every": every,
                        "test_auroc": report["best_test"]["auroc"],
                        "paper": "DUCHESS arXiv 2509.24957", "report": _jsonable(report)})
    return probe, report


def kind_difficulty_baseline(data: BranchDataset, split: PromptSplit, every: int) -> float:
    """Test AUROC over the decode rounds of a score that knows only the task's kind and
    difficulty (their branch accuracy on the training prompts): prompt difficulty, no probe."""
    def key(b):
        return (data.meta[b].get("kind"), data.meta[b].get("difficulty"))

    acc: dict = {}
    for b in split.train:
        acc.setdefault(key(b), []).append(data.correct[b])
    prior = float(np.mean(data.correct)) if len(data) else 0.5
    scores, labels = [], []
    for b in split.test:
        n = int(((data.positions[b] % every == 0) & (data.positions[b] > 0)).sum())
        scores += [float(np.mean(acc[key(b)])) if key(b) in acc else prior] * n
        labels += [data.correct[b]] * n
    return auroc(scores, labels)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=float))


# ----------------------------------------------------------------------------- collection

def correctness_tasks(n: int, seed: int, kinds=TOOL_FREE_KINDS, difficulties=(2, 3)):
    from vllm_ext.testbed.tasks import generate_tasks

    return generate_tasks(n, seed, kinds=kinds, difficulties=difficulties)
