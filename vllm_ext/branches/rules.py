"""How a multi-branch request spends its branches: self-consistency, ESC and DUCHESS.

Paper: DUCHESS (arXiv 2509.24957, ../shared/PAPERS.md). A request asks for n sampled branches
and one answer. Each plan below is pure (no vLLM imports): the runner
(`vllm_ext.branches.runner`) starts the branches it names, reports each branch's probe score
every i generated tokens (`round`) and each finished branch's answer (`finish`), and does what
the plan returns.

* `SelfConsistency` (Wang et al. 2023): run all n, majority vote.
* `EarlyStopping` (ESC, Li et al. 2024): run windows of w branches; stop after a window whose
  answers are unanimous, else start the next window, up to n.
* `Duchess`: `start` branches run at once (0: all n, the paper's setting). Per branch and
  probe round, with score s = P(branch ends correct):
    - terminate if s < tau for S consecutive rounds (never the last live branch while no
      answer is in);
    - else duplicate (fork, sharing the KV prefix) if s >= dup_tau, a terminated branch left
      a slot free (fewer than `start` run) and the request has run fewer than `max_branches`;
    - else continue.
  The request stops when `agree` finished branches share an answer. When every branch of the
  current window has ended without that, the next window of fresh branches starts while n
  allows, unless the probe terminated a branch of this window (it judged the prompt hard:
  more samples would be spent on likely-wrong answers). The answer is the probe-weighted
  majority (weight = a branch's last score, 1 without a probe).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

RUNNING, FINISHED, TERMINATED, CANCELLED = "running", "finished", "terminated", "cancelled"


@dataclass
class Branch:
    index: int
    parent: int | None = None   # the branch it was forked from
    inherited: int = 0          # tokens taken from the parent at the fork
    tokens: int = 0             # tokens this branch generated itself
    scores: list[float] = field(default_factory=list)
    low_streak: int = 0
    state: str = RUNNING
    answer: str | None = None

    @property
    def weight(self) -> float:
        return self.scores[-1] if self.scores else 1.0


@dataclass
class Step:
    """What the runner does next: branches to start (new `Branch` objects, forks included),
    branches to terminate, and whether the request is done."""
    start: list[Branch] = field(default_factory=list)
    terminate: list[int] = field(default_factory=list)
    done: bool = False


class Plan:
    name = "sc"

    def __init__(self, n: int) -> None:
        self.n = n
        self.branches: list[Branch] = []

    # ---- called by the runner ------------------------------------------------------------
    def begin(self) -> Step:
        return Step(start=[self._new() for _ in range(self._initial())])

    def round(self, index: int, score: float | None) -> Step:
        if score is not None:
            self.branches[index].scores.append(float(score))
        return Step()

    def finish(self, index: int, answer: str | None) -> Step:
        branch = self.branches[index]
        branch.state, branch.answer = FINISHED, answer
        return Step(done=not self.running())

    # ---- shared ---------------------------------------------------------------------------
    def _initial(self) -> int:
        return self.n

    def _new(self, parent: Branch | None = None) -> Branch:
        branch = Branch(len(self.branches))
        if parent is not None:
            branch.parent, branch.inherited = parent.index, parent.inherited + parent.tokens
        self.branches.append(branch)
        return branch

    def running(self) -> list[Branch]:
        return [b for b in self.branches if b.state == RUNNING]

    def finished(self) -> list[Branch]:
        return [b for b in self.branches if b.state == FINISHED]

    def votes(self, weighted: bool = False) -> dict[str, float]:
        votes: dict[str, float] = defaultdict(float)
        for b in self.finished():
            if b.answer is not None:
                votes[b.answer] += b.weight if weighted else 1.0
        return dict(votes)

    def choose(self) -> tuple[str | None, Branch | None]:
        """The answer and the finished branch that carries it (the best-scoring one); with
        no parsable answer, the best-scoring finished branch and None."""
        votes = self.votes(weighted=self.name == "duchess")
        done = self.finished()
        if not done:
            return None, None
        if not votes:
            return None, max(done, key=lambda b: b.weight)
        answer = max(votes, key=lambda a: (votes[a], -self._first_index(a)))
        carriers = [b for b in done if b.answer == answer]
        return answer, max(carriers, key=lambda b: b.weight)

    def _first_index(self, answer: str) -> int:
        return min(b.index for b in self.finished() if b.answer == answer)


class SelfConsistency(Plan):
    name = "sc"


class EarlyStopping(Plan):
    name = "esc"

    def __init__(self, n: int, window: int) -> None:
        super().__init__(n)
        self.window = window
        self.window_start = 0

    def _initial(self) -> int:
        return min(self.window, self.n)

    def finish(self, index: int, answer: str | None) -> Step:
        super().finish(index, answer)
        if self.running():
            return Step()
        answers = {b.answer for b in self.branches[self.window_start:]}
        if (len(answers) == 1 and None not in answers) or len(self.branches) >= self.n:
            return Step(done=True)
        self.window_start = len(self.branches)
        more = min(self.window, self.n - len(self.branches))
        return Step(start=[self._new() for _ in range(more)])


class Duchess(Plan):
    name = "duchess"

    def __init__(self, n: int, tau: float, patience: int, dup_tau: float, max_branches: int,
                 agree: int, start: int = 0) -> None:
        super().__init__(n)
        self.tau, self.patience, self.dup_tau = tau, patience, dup_tau
        self.max_branches, self.agree = max(max_branches, 1), agree
        self.width = min(start or n, n, self.max_branches)
        self.window_start = 0

    def _initial(self) -> int:
        return self.width

    def round(self, index: int, score: float | None) -> Step:
        super().round(index, score)
        branch = self.branches[index]
        if score is None or branch.state != RUNNING:
            return Step()  # no probe value: continue (self-consistency behaviour)
        branch.low_streak = branch.low_streak + 1 if score < self.tau else 0
        if branch.low_streak >= self.patience and self._may_terminate():
            branch.state = TERMINATED
            return Step(terminate=[index], done=not self.running())
        if (score >= self.dup_tau and len(self.running()) < self.width
                and len(self.branches) < self.max_branches):
            return Step(start=[self._new(parent=branch)])  # refill a terminated slot
        return Step()

    def _may_terminate(self) -> bool:
        return len(self.running()) > 1 or any(b.answer is not None for b in self.finished())

    def finish(self, index: int, answer: str | None) -> Step:
        super().finish(index, answer)
        if answer is not None and self.votes().get(answer, 0) >= self.agree:
            return Step(done=True)
        if self.running():
            return Step()
        window = self.branches[self.window_start:]
        fresh = sum(b.parent is None for b in self.branches)
        room = min(self.width, self.n - fresh, self.max_branches - len(self.branches))
        if room <= 0 or any(b.state == TERMINATED for b in window):
            return Step(done=True)  # budget spent, or the probe judged the prompt hard
        self.window_start = len(self.branches)
        return Step(start=[self._new() for _ in range(room)])


def make_plan(mode: str, n: int, ext) -> Plan:
    """The plan of `mode` for a request of `n` branches, with the knobs of ExtConfig `ext`."""
    if mode == "sc":
        return SelfConsistency(n)
    if mode == "esc":
        return EarlyStopping(n, ext.branch_esc_window)
    if mode == "duchess":
        return Duchess(n, ext.branch_tau, ext.branch_patience, ext.branch_dup_tau,
                       max(ext.branch_max, n), ext.branch_agree, ext.branch_start)
    raise ValueError(f"unknown branch mode {mode!r}")


def extract_answer(text: str, pattern: re.Pattern) -> str | None:
    """The first group of the last match of `pattern` in `text`, whitespace-normalised."""
    found = pattern.findall(text)
    if not found:
        return None
    last = found[-1] if isinstance(found[-1], str) else found[-1][0]
    answer = " ".join(last.split())
    return answer or None
