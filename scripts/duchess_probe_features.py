"""DUCHESS probe inputs, offline: does the branch's position (tokens generated) and its prompt's
end-of-prefill row, next to the current row, lift the correctness probe's held-out AUROC?

Same dataset, split (by prompt, seed 0), cadence (16) and MLP trainer as `vllm-ext train-probe
--kind correctness`; prints validation and test AUROC (pooled over rounds, first round, within
prompt) for four input sets at layers 0 and 2:
    .venv/bin/python scripts/duchess_probe_features.py /tmp/duchess/branches.pt
"""
import sys

import torch
from vllm_ext.probes.correctness import (BranchDataset, split_by_prompt, probe_rows, train_mlp,
                                         _logits, evaluate)
raw = torch.load(sys.argv[1] if len(sys.argv) > 1 else "/tmp/duchess/branches.pt",
                 weights_only=False)
data = BranchDataset(**raw) if isinstance(raw, dict) else raw
split = split_by_prompt(data.prompt, seed=0)
every = 16


def feats(rows, layer_pos, mode):
    x = rows.x
    if mode == "row":
        return x
    pos = torch.as_tensor(rows.pos, dtype=torch.float32)[:, None]
    cols = [x, pos / 100.0, (pos / 100.0) ** 2]
    if mode == "row+pos":
        return torch.cat(cols, 1)
    # prefill row of the same branch
    pre = torch.stack([data.hidden[b][0, layer_pos, :].float() for b in rows.branch])
    if mode == "row+pos+prefill":
        return torch.cat(cols + [pre], 1)
    if mode == "prefill+pos":
        return torch.cat([pre, pos / 100.0, (pos / 100.0) ** 2], 1)


for layer_pos in (0, 2):
    tr, va, te = (probe_rows(data, s, layer_pos, every, True)
                  for s in (split.train, split.val, split.test))
    for mode in ("row", "row+pos", "prefill+pos", "row+pos+prefill"):
        m = train_mlp(feats(tr, layer_pos, mode), tr.y, feats(va, layer_pos, mode), va.y,
                      epochs=30, seed=0)
        ev = evaluate(_logits(m, feats(te, layer_pos, mode)), te, every)
        evv = evaluate(_logits(m, feats(va, layer_pos, mode)), va, every)
        print(f"layer {data.layers[layer_pos]} {mode:<18} val {evv['auroc']:.3f} test pooled "
              f"{ev['auroc']:.3f} first {ev['auroc_first_round']:.3f} "
              f"within {ev['auroc_within_prompt']:.3f}", flush=True)
