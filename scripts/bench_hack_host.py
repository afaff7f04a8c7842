"""Host-side cost of a HACK decode step on CPU, A/B interleaved in one process.

* planner: ``HackPlanner.plan`` reference loop (``reference=True``) vs the fast path
  (``kv_plan.plan_fast``), decode steps at 1 / 8 / 32 requests (contexts 100-900, Π 64, block
  128, pools sized as the engine sizes them), both planners fed the same steps, order alternated;
* write: one layer's ``write`` of 32 decode tokens through the ``torch.ops`` op
  (``write_kernel_op``) vs the pybind handles (``write_kernel``), 4 layers per step, a new plan
  each step, key / value padded as the engine's; the caches are checked equal at the end.

Prints medians (ms) over the steps. ``.venv/bin/python scripts/bench_hack_host.py``
"""
import argparse
import statistics
import time

import torch

from vllm_ext.kernels import cpu_kernel as ck
from vllm_ext.kernels.kv_store import HackCache, HackPlanner
from vllm_ext.kernels.quant import HackLayout

LAY, BS, H, LAYERS = HackLayout(4, 32, 64), 128, 2, 4


def _setup(R: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(100, 900, (R,), generator=g).tolist()
    bt = (torch.randperm(R * 16, generator=g) + 1).reshape(R, 16).int()
    return lens, bt, [0] + torch.tensor(lens).cumsum(0).tolist()


def bench_planner(R: int, steps: int) -> tuple[float, float]:
    lens, bt, pre = _setup(R, R)
    pl = [HackPlanner(LAY, BS, R + 8, 2 * R + 16, reference=r) for r in (True, False)]
    for p in pl:
        p.plan(pre, lens, bt)
    qsl, t = list(range(R + 1)), ([], [])
    for s in range(steps):
        lens = [L + 1 for L in lens]
        outs = [None, None]
        for k in ((0, 1) if s % 2 else (1, 0)):
            t0 = time.perf_counter()
            outs[k] = pl[k].plan(qsl, lens, bt)
            t[k].append(time.perf_counter() - t0)
        assert outs[0][1:] == outs[1][1:]
    return tuple(statistics.median(x) * 1e3 for x in t)


def bench_write(steps: int, R: int = 32) -> tuple[float, float]:
    ext = ck.load_extension()
    lens, bt, pre = _setup(R, 0)
    pl = HackPlanner(LAY, BS, R + 8, 2 * R + 16)
    caches = [[HackCache.allocate(LAY, R * 16 + 1, H, BS, R + 8, 2 * R + 16)
               for _ in range(LAYERS)] for _ in range(2)]
    kv = torch.randn(pre[-1], H, 32).bfloat16()
    plan = pl.plan(pre, lens, bt)[0]
    for c in caches[0] + caches[1]:
        ck.write_kernel(ext, c, plan, kv, kv)
    qsl, plans = list(range(R + 1)), []
    for _ in range(steps):
        lens = [L + 1 for L in lens]
        plans.append(pl.plan(qsl, lens, bt)[0])
    key = torch.randn(R + 8, H, 32).bfloat16()
    fn, t = (ck.write_kernel_op, ck.write_kernel), ([], [])
    for s, p in enumerate(plans):
        for k in ((0, 1) if s % 2 else (1, 0)):
            t0 = time.perf_counter()
            for c in caches[k]:
                fn[k](ext, c, p, key, key)
            t[k].append((time.perf_counter() - t0) / LAYERS)
    for a, b in zip(*caches):
        assert torch.equal(a.pages, b.pages) and torch.equal(a.stage, b.stage)
    return tuple(statistics.median(x[5:]) * 1e3 for x in t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for R in (1, 8, 32):
        ref, fast = bench_planner(R, a.steps)
        print(f"planner, {R:2d} decode requests: reference {ref:.3f} ms, fast {fast:.3f} ms "
              f"({ref / fast:.1f}x)")
    op, h = bench_write(a.steps)
    print(f"write per layer, 32 decode tokens: torch.ops {op:.3f} ms, pybind handles {h:.3f} ms "
          f"({op / h:.1f}x)")


if __name__ == "__main__":
    main()
