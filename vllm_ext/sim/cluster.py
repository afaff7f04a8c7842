"""Many replicas behind a router, advanced as discrete events in global time order.

The next event is either an arrival (routed to a replica, round-robin or least-loaded) or the
next step of the busy replica whose clock is earliest; a request arriving during a step waits
for that replica's next step, as in the engine. Every request ends finished: a request that
can never be scheduled (larger than the KV cache) raises instead of spinning.
"""
from __future__ import annotations

import copy
import itertools
from typing import Callable

from vllm_ext.sched.policy import Policy
from vllm_ext.sim.replica import Replica, ReplicaConfig, SimRequest

ROUTERS = ("round_robin", "least_loaded")


def simulate(requests: list[SimRequest], config: ReplicaConfig,
             policy_factory: Callable[[], Policy], num_replicas: int = 1,
             router: str = "round_robin") -> list[SimRequest]:
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; choose from {ROUTERS}")
    reqs = sorted((copy.copy(r) for r in requests), key=lambda r: r.arrival_s)
    replicas = [Replica(config, policy_factory()) for _ in range(num_replicas)]
    rr = itertools.cycle(replicas)
    i = 0
    while i < len(reqs) or any(r.busy() for r in replicas):
        busy = [r for r in replicas if r.busy()]
        next_step = min((r.now for r in busy), default=float("inf"))
        if i < len(reqs) and reqs[i].arrival_s <= next_step:
            req = reqs[i]
            i += 1
            rep = next(rr) if router == "round_robin" else min(
                replicas, key=lambda r: len(r.waiting) + len(r.running))
            if not rep.busy():
                rep.now = max(rep.now, req.arrival_s)
            rep.add(req)
            continue
        rep = min(busy, key=lambda r: r.now)
        if rep.step() == 0.0:
            stuck = rep.waiting[0]
            raise ValueError(f"request {stuck.request_id} ({stuck.prompt_len}+"
                             f"{stuck.output_len} tokens) can never fit this replica's KV cache")
    done = [r for rep in replicas for r in rep.finished]
    assert len(done) == len(reqs), "simulator lost a request"
    return sorted(done, key=lambda r: r.arrival_s)


def latency_stats(done: list[SimRequest]) -> dict:
    import numpy as np

    e2e = np.array([r.finish_s - r.arrival_s for r in done])
    ttft = np.array([r.first_token_s - r.arrival_s for r in done])
    return {"mean_e2el_s": float(e2e.mean()), "median_e2el_s": float(np.median(e2e)),
            "p99_e2el_s": float(np.percentile(e2e, 99)), "mean_ttft_s": float(ttft.mean()),
            "p99_ttft_s": float(np.percentile(ttft, 99)), "n": len(done),
            "preemptions": int(sum(r.preemptions for r in done))}
