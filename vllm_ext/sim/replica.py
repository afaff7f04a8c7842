"""One simulated engine replica: vLLM-style continuous batching, step by step.

Each step mirrors vLLM V1's scheduler loop closely enough for latency studies:
  * the policy orders `running` and `waiting` (`fcfs` leaves arrival order), and may preempt
    one running request for the waiting head (budgeted per step), as PredictiveScheduler does;
  * running requests are served in order: a decode gets 1 token, a prefill a chunk of the
    remaining token budget; when KV blocks run out the last running request is preempted
    (recompute: its computed tokens are dropped, unless `recompute_on_preempt` is off, which
    models preempt-resume for closed-form queueing checks);
  * waiting requests are admitted (in order) only if nothing was preempted this step, while
    slots, token budget and KV blocks last;
  * step time comes from a `StepCost` calibrated on the live engine; trail/spjf charge a
    victim's recompute against a preemption at that cost, as the engine does
    (`vllm_ext.sched.step_cost`, `preemption_cost`);
  * preemptions are counted by cause (policy / kv_pressure), as the engine's ``/metrics``;
  * trail/spjf's starvation bound runs on the profile's decode step time, on the simulated
    clock (`RequestView.now`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from vllm_ext.sched.policy import Policy, RequestView
from vllm_ext.sched.stats import PREEMPTION_CAUSES


@dataclass
class StepCost:
    """seconds per step = base + per_token * scheduled tokens + per_seq * running requests"""
    base_s: float = 0.005
    per_token_s: float = 0.0001
    per_seq_s: float = 0.0005

    def step_time(self, tokens: int, seqs: int) -> float:
        return self.base_s + self.per_token_s * tokens + self.per_seq_s * seqs

    def steps_per_token(self, batch: int) -> float:
        """Decode steps of `batch` requests that one recomputed token costs."""
        return self.per_token_s / self.step_time(max(1, batch), max(1, batch))


@dataclass
class ReplicaConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    num_blocks: int = 10**9
    block_size: int = 16
    max_preemptions_per_step: int = 1
    recompute_on_preempt: bool = True
    preemption_cost: bool = True  # the engine's --ext-no-preemption-cost turns it off
    cost: StepCost = field(default_factory=StepCost)


@dataclass
class SimRequest:
    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    true_output_len: int | None = None
    predictions: dict = field(default_factory=dict)
    computed: int = 0           # tokens whose KV is present
    generated: int = 0
    preemptions: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def needed(self) -> int:  # tokens to compute before the next token can be sampled
        return self.prompt_len + self.generated - self.computed

    def view(self, now: float = 0.0) -> RequestView:
        return RequestView(self.request_id, self.arrival_s, self.prompt_len, self.generated,
                           self.output_len, self.preemptions, self.true_output_len,
                           self.predictions, now)


class Replica:
    def __init__(self, config: ReplicaConfig, policy: Policy) -> None:
        self.config, self.policy = config, policy
        self.now = 0.0
        self.waiting: list[SimRequest] = []
        self.running: list[SimRequest] = []
        self.finished: list[SimRequest] = []
        self.max_blocks_used = 0
        self.preemptions = dict.fromkeys(PREEMPTION_CAUSES, 0)

    # ---- accounting -------------------------------------------------------------------------
    def blocks(self, r: SimRequest, extra_tokens: int = 0) -> int:
        return math.ceil((r.computed + extra_tokens) / self.config.block_size)

    def used_blocks(self) -> int:
        return sum(self.blocks(r) for r in self.running)

    def add(self, request: SimRequest) -> None:
        self.waiting.append(request)

    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------------------
    def _key(self, r: SimRequest):
        return self.policy.sort_key(r.view(self.now))

    def _preempt(self, r: SimRequest, cause: str = "kv_pressure") -> None:
        self.running.remove(r)
        self.preemptions[cause] += 1
        r.preemptions += 1
        if self.config.recompute_on_preempt:
            r.computed = 0
        self.waiting.insert(0, r)

    def _policy_preemptions(self) -> None:
        if not self.policy.reorders:
            return
        batch = max(1, len(self.running))  # the profile's decode step, as the engine's fit
        self.policy.calibrate(self.config.cost.step_time(batch, batch),
                              self.config.cost.steps_per_token(batch)
                              if self.config.preemption_cost else 0.0)
        self.running.sort(key=self._key)
        self.waiting.sort(key=self._key)
        for _ in range(self.config.max_preemptions_per_step):
            if not self.waiting or self._fits(self.waiting[0]):
                return
            victim = self.policy.choose_victim(self.waiting[0].view(self.now),
                                               [r.view(self.now) for r in self.running])
            if victim is None:
                return
            self._preempt(next(r for r in self.running if r.request_id == victim.request_id),
                          "policy")
            self.waiting.sort(key=self._key)

    def _fits(self, r: SimRequest) -> bool:
        if len(self.running) >= self.config.max_num_seqs:
            return False
        free = self.config.num_blocks - self.used_blocks()
        return free >= self.blocks(r, r.needed) - self.blocks(r) + len(self.running)

    def step(self) -> float:
        """Run one engine step; returns its duration (0 if idle)."""
        self._policy_preemptions()
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            r = self.running[i]
            n = min(r.needed, budget)
            while self.used_blocks() + self.blocks(r, n) - self.blocks(r) > self.config.num_blocks:
                victim = self.running[-1]
                scheduled.pop(victim.request_id, None)
                self._preempt(victim)
                preempted = True
                if victim is r:
                    break
            if r not in self.running:
                break
            scheduled[r.request_id] = n
            budget -= n
            r.computed += n  # KV allocated now; counted as computed at step end
            i += 1
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                r = self.waiting[0]
                n = min(r.needed, budget)
                if self.used_blocks() + self.blocks(r, n) > self.config.num_blocks:
                    break
                self.waiting.pop(0)
                self.running.append(r)
                scheduled[r.request_id] = n
                budget -= n
                r.computed += n
        if not scheduled:
            return 0.0
        tokens = sum(scheduled.values())
        dt = self.config.cost.step_time(tokens, len(scheduled))
        self.now += dt
        self.max_blocks_used = max(self.max_blocks_used, self.used_blocks())
        for r in list(self.running):
            if r.request_id in scheduled and r.needed == 0:
                r.generated += 1
                if r.first_token_s is None:
                    r.first_token_s = self.now
                if r.generated >= r.output_len:
                    r.finish_s = self.now
                    self.running.remove(r)
                    self.finished.append(r)
        return dt
