"""Difficulty-aware scheduling (DUCHESS, arXiv 2509.24957): easy prompts first.

Rule (policy ``difficulty``): a request's ease is P(correct) of its prompt, read from the
correctness probe's first value for the request: the probe row at the end of its prefill (the
prompt's own activations; on held-out prompts this row scores AUROC 0.865 for "the branch ends
correct", docs/duchess.md). Requests are ordered by vLLM's ``priority`` first (strict levels),
then by ease, highest first, then arrival. Requests with the same prompt tokens share one
score, so the sibling branches of a multi-branch request (`vllm_ext.branches`) that still wait
are ranked as soon as the first of them has been prefilled; a prompt not scored yet ranks at
the mean score seen so far (so a new prompt neither jumps every scored one nor waits behind
all of them). A prompt's score lives while one of its requests does. Without a correctness
probe no score ever arrives and the order is FCFS.

Preemption: none (`choose_victim` never names a victim), as in DUCHESS's serving setup:
ordering decides who is admitted next, and a request admitted runs to its end.

Pure python: the engine adapter (`vllm_ext.sched.scheduler`) calls `on_arrival`, `observe`
and `forget`; `rekey_waiting` tells it when a newly scored prompt changes waiting keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm_ext.sched.policy import Policy, RequestView

SCORE = "p_correct"


@dataclass
class DifficultyPolicy(Policy):
    name = "difficulty"
    reorders = True
    prompt_of: dict[str, int] = field(default_factory=dict)       # request -> prompt hash
    requests_of: dict[int, int] = field(default_factory=dict)     # prompt -> live requests
    ease: dict[int, float] = field(default_factory=dict)          # prompt -> P(correct)
    total: float = 0.0
    count: int = 0
    rekey_waiting: bool = False  # set when a prompt got its first score; the engine clears it

    def on_arrival(self, request_id: str, prompt_token_ids) -> None:
        prompt = hash(tuple(prompt_token_ids))
        if self.prompt_of.get(request_id) == prompt:
            return  # told again (a live switch replays arrivals)
        self.forget(request_id)
        self.prompt_of[request_id] = prompt
        self.requests_of[prompt] = self.requests_of.get(prompt, 0) + 1

    def observe(self, request_id: str, predictions: dict, num_output_tokens: int) -> None:
        prompt = self.prompt_of.get(request_id)
        value = predictions.get(SCORE)
        if prompt is None or value is None or prompt in self.ease:
            return
        self.ease[prompt] = float(value)
        self.total += float(value)
        self.count += 1
        self.rekey_waiting = True

    def forget(self, request_id: str) -> None:
        prompt = self.prompt_of.pop(request_id, None)
        if prompt is None:
            return
        left = self.requests_of[prompt] - 1
        if left:
            self.requests_of[prompt] = left
        else:
            del self.requests_of[prompt]
            self.ease.pop(prompt, None)

    def prompt_ease(self, view: RequestView) -> float:
        score = self.ease.get(self.prompt_of.get(view.request_id))
        if score is not None:
            return score
        return self.total / self.count if self.count else 0.5

    def sort_key(self, view: RequestView) -> tuple:
        return (view.priority, -self.prompt_ease(view), view.arrival_time, view.request_id)
