"""Does a captured layer carry branch-level correctness beyond the prompt? (docs/duchess.md)

On a `BranchDataset` cache (`train-probe --kind correctness --dataset FILE`), per layer:
subtract from each row the mean row of the same prompt at the same position (over its
branches), train a logistic regression on the centred training rows and report the
within-prompt AUROC on the test prompts (same split as the probe). A serving probe cannot
centre (it sees one row), so this is an upper-bound diagnostic, not a probe.

    .venv/bin/python scripts/duchess_within_prompt.py /tmp/duchess/branches.pt
"""
import sys

import numpy as np

from vllm_ext.probes.correctness import (BranchDataset, auroc, probe_rows, split_by_prompt,
                                         train_linear)


def centred(rows):
    x = rows.x.clone()
    for key in set(zip(rows.prompt.tolist(), rows.pos.tolist())):
        m = (rows.prompt == key[0]) & (rows.pos == key[1])
        x[m] -= x[m].mean(0)
    return x


def main(path: str, every: int = 16) -> None:
    data = BranchDataset.load(path)
    split = split_by_prompt(data.prompt, seed=0)
    for pos, layer in enumerate(data.layers):
        tr, va, te = (probe_rows(data, s, pos, every, prefill=False)
                      for s in (split.train, split.val, split.test))
        module = train_linear(centred(tr), tr.y, centred(va), va.y)
        score = module(centred(te)).detach().squeeze(-1).numpy()
        within = [auroc(score[te.prompt == p], te.y[te.prompt == p]) for p in np.unique(te.prompt)]
        within = [a for a in within if not np.isnan(a)]
        print(f"layer {layer}: within-prompt AUROC (centred rows, linear) "
              f"{np.mean(within):.3f} over {len(within)} test prompts with disagreeing branches")


if __name__ == "__main__":
    main(sys.argv[1])
