"""LAMPS admission by predicted peak memory (`--ext-lamps-admission peak`).

LAMPS (arXiv 2410.18248) ranks requests by the memory they hold over their life. vLLM admits
the head of the waiting queue whenever its *prompt* fits the free KV blocks; the running
requests then grow into the pool and vLLM preempts (a recompute) when a step finds no block.
With ``peak`` the scheduler offers vLLM only the head of the ranked waiting queue that fits
the KV pool at its predicted peak: the free blocks must cover every running request's
predicted growth (prompt + output so far + predicted remaining output, in blocks, less what it
holds) plus each admitted candidate's whole predicted size. The order is kept (no small request
slips past a large head: the rank and its starvation guard decide who is next), and with
nothing running the head is always offered, so the queue never stalls. Remaining lengths are
the LAMPS policy's (TRAIL's probe, capped by ``max_tokens``).

`offer_count` is the rule (pure); `hold_back` applies it to the scheduler for one step: the
waiting requests past the offered head leave the queue while vLLM schedules and come back
behind it in the same order (`restore`).
"""
from __future__ import annotations

import math
import sys
from typing import Iterable, Sequence


def blocks(tokens: float, block_size: int) -> int:
    if tokens == math.inf:  # no bound on the length: larger than any pool
        return sys.maxsize
    return math.ceil(max(0.0, tokens) / block_size)


def offer_count(free_blocks: int, block_size: int, running: Sequence[tuple[int, float]],
                waiting: Iterable[tuple[int, float]]) -> int:
    """How many of `waiting` (in rank order) to offer this step. Each entry is (tokens now,
    predicted remaining tokens); a running request's growth is its predicted peak in blocks
    less the blocks its present tokens fill. `waiting` is read only up to the first request
    that does not fit (a generator sizes no more of the queue than that)."""
    headroom = free_blocks - sum(blocks(t + r, block_size) - blocks(t, block_size)
                                 for t, r in running)
    offered = 0
    for tokens, remaining in waiting:
        need = blocks(tokens + remaining, block_size)
        if need > headroom and (running or offered):
            break
        headroom -= need
        offered += 1
    return offered


def hold_back(sched) -> list:
    """Take the waiting requests past the offered head out of `sched.waiting`; returns them."""
    policy, size = sched.ext_policy, sched.block_size

    def sized(request) -> tuple[int, float]:
        return request.num_tokens, policy.remaining(sched.view(request))

    n = offer_count(sched.kv_cache_manager.block_pool.get_num_free_blocks(), size,
                    [sized(r) for r in sched.running], (sized(r) for r in sched.waiting))
    held = []
    while len(sched.waiting) > n:
        held.append(sched.waiting.pop())
    held.reverse()
    return held


def restore(sched, held: list) -> None:
    for request in held:
        sched.waiting.add_request(request)
