"""Synthetic reasoning tasks for the embedded testbed.

Design
------
Every task is a one-turn chat: a short user prompt (``add 347+85``) and an assistant
``target`` that *shows its work* line by line and ends with a checkable ``answer: ...`` line.
The work is written so that each line only needs local information (the previous line and
one or two prompt symbols), which a tiny MoE trained for minutes on CPU can learn.

Kinds (difficulty 1..3 scales the number of digits, items or steps, hence the output length):

* ``add``   digit-by-digit addition, right to left, with carries and the running result.
* ``sub``   digit-by-digit subtraction (a >= b) with borrows and the running result.
* ``mul``   multiplication as repeated addition, running sums shown.
* ``gcd``   Euclid's algorithm, one ``a mod b = r`` line per step (step count is hard to
            predict from the prompt).
* ``sort``  selection sort: each line is ``sorted prefix | remaining items``.
* ``count`` count one letter in a list, the running count after every item.
* ``calc``  tool task: the model emits ``<call>calc 12*34</call>``; the harness runs the tool and
            inserts ``<result>408</result>``; the model continues (chains of 1..3 calls).
* ``lookup`` tool task with a slow tool: ``<call>lookup kamira</call>`` returns the number stored
            for a name in a fixed deterministic table; higher levels look up several names and
            add them with ``calc``.

Each tool has a ``latency_s`` (``calc`` fast, ``lookup`` slow) so simulated API-call durations
vary. Tokens are bytes (see ``tokenizer.py``); target lengths span about 20..300 tokens and grow
with difficulty; the carries, borrows and Euclid steps make length only partly predictable.

Generation is deterministic for a seed: ``generate_tasks(n, seed)`` always returns the same
tasks. ``check_answer`` parses the last ``answer:`` line of a completion. ``training_segments``
splits the rendered chat into (text, trained) pieces so a trainer can mask the prompt and the
tool results (they come from the harness, not from the model).
"""
from __future__ import annotations

import ast
import operator
import random
import re
import zlib
from dataclasses import dataclass, field

KINDS = ("add", "sub", "mul", "gcd", "sort", "count", "calc", "lookup")
TOOL_KINDS = ("calc", "lookup")
DIFFICULTIES = (1, 2, 3)
USER, ASSISTANT, EOS = "<|user|>", "<|assistant|>", "</s>"
CALL_OPEN, CALL_CLOSE, RESULT_OPEN, RESULT_CLOSE = "<call>", "</call>", "<result>", "</result>"


@dataclass(frozen=True)
class Tool:
    name: str
    latency_s: float
    description: str


TOOLS = {
    "calc": Tool("calc", 0.05, "evaluate an integer expression with + - * // % and parentheses"),
    "lookup": Tool("lookup", 0.8, "return the number stored for a name in a fixed table"),
}


@dataclass(frozen=True)
class ToolCall:
    tool: str
    arg: str
    result: str

    @property
    def latency_s(self) -> float:
        return TOOLS[self.tool].latency_s

    @property
    def call_text(self) -> str:
        return f"{CALL_OPEN}{self.tool} {self.arg}{CALL_CLOSE}"

    @property
    def result_text(self) -> str:
        return f"{RESULT_OPEN}{self.result}{RESULT_CLOSE}"


@dataclass
class Task:
    kind: str
    difficulty: int
    prompt: str
    target: str  # full assistant text: shown work, tool call/result markers, answer line
    answer: str
    tool_calls: list = field(default_factory=list)  # list[ToolCall], in order


# ----------------------------------------------------------------------------- tools

_SYLLABLES = ("ka", "lo", "mi", "ru", "ze", "po", "ta", "ni", "vo", "shi", "de", "ga", "bu", "fe", "ro", "su")
NAMES = tuple(a + b for a in _SYLLABLES for b in _SYLLABLES if a != b)  # 240 names


def lookup_value(name: str) -> int | None:
    """The fixed table behind the ``lookup`` tool (crc32 of the name, 100..9999)."""
    if name not in NAMES:
        return None
    return 100 + zlib.crc32(name.encode()) % 9900


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def _calc(expr: str) -> int:
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = ev(node.left), ev(node.right)
            if abs(a) > 10**30 or abs(b) > 10**30:
                raise ValueError("too large")
            return _BINOPS[type(node.op)](a, b)
        raise ValueError("unsupported")

    if len(expr) > 200:
        raise ValueError("too long")
    return ev(ast.parse(expr.strip(), mode="eval"))


def parse_call(call_text: str) -> tuple[str, str]:
    """``'<call>calc 1+2</call>'`` or ``'calc 1+2'`` -> ``('calc', '1+2')``."""
    body = call_text.strip()
    if body.startswith(CALL_OPEN):
        body = body[len(CALL_OPEN):]
    if body.endswith(CALL_CLOSE):
        body = body[: -len(CALL_CLOSE)]
    name, _, arg = body.strip().partition(" ")
    return name, arg.strip()


def run_tool(call_text: str) -> str:
    """Run one tool call (with or without the ``<call>`` markers); return the result text.

    Errors are returned as text (``error: ...``), never raised: the model sees them.
    """
    name, arg = parse_call(call_text)
    if name == "calc":
        try:
            return str(_calc(arg))
        except (ValueError, SyntaxError, ZeroDivisionError, RecursionError):
            return "error: bad expression"
    if name == "lookup":
        value = lookup_value(arg)
        return "error: unknown name" if value is None else str(value)
    return f"error: unknown tool {name}"


def tool_latency(call_text: str) -> float:
    """Simulated duration of a call (0 for an unknown tool)."""
    tool = TOOLS.get(parse_call(call_text)[0])
    return tool.latency_s if tool else 0.0


def pending_call(text: str) -> str | None:
    """If ``text`` ends with a closed ``<call>...</call>``, return that call's text (for a harness)."""
    if not text.endswith(CALL_CLOSE):
        return None
    start = text.rfind(CALL_OPEN)
    return None if start < 0 else text[start:]


def _call(tool: str, arg: str) -> ToolCall:
    return ToolCall(tool, arg, run_tool(f"{tool} {arg}"))


# ----------------------------------------------------------------------------- generators

def _num(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    d = rng.randint(lo_digits, hi_digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)


def _add(rng, d):
    lo, hi = {1: (1, 2), 2: (3, 4), 3: (5, 7)}[d]
    a, b = _num(rng, lo, hi), _num(rng, lo, hi)
    ra, rb = str(a)[::-1], str(b)[::-1]
    lines, carry, s = [], 0, ""
    for i in range(max(len(ra), len(rb))):
        x, y = int(ra[i]) if i < len(ra) else 0, int(rb[i]) if i < len(rb) else 0
        t = x + y + carry
        s = str(t % 10) + s
        lines.append(f"{x}+{y}{'+1' if carry else ''}={t}{' carry 1' if t > 9 else ''} so {s}")
        carry = t // 10
    if carry:
        s = "1" + s
        lines.append(f"carry 1 so {s}")
    return f"add {a}+{b}", lines, str(a + b)


def _sub(rng, d):
    lo, hi = {1: (1, 2), 2: (3, 4), 3: (5, 7)}[d]
    a, b = sorted((_num(rng, lo, hi), _num(rng, lo, hi)), reverse=True)
    ra, rb = str(a)[::-1], str(b)[::-1]
    lines, borrow, s = [], 0, ""
    for i in range(len(ra)):
        x, y = int(ra[i]), int(rb[i]) if i < len(rb) else 0
        v = x - y - borrow
        top = f"1{x}" if v < 0 else str(x)
        expr = f"{top}-{y}{'-1' if borrow else ''}"
        borrow = 1 if v < 0 else 0
        s = str(v % 10) + s
        lines.append(f"{expr}={v % 10}{' borrow 1' if borrow else ''} so {s}")
    return f"subtract {a}-{b}", lines, str(a - b)


def _mul(rng, d):
    a = rng.randint(*{1: (2, 20), 2: (10, 99), 3: (10, 999)}[d])
    b = rng.randint(*{1: (2, 4), 2: (3, 7), 3: (6, 11)}[d])
    lines, acc = [f"1*{a}={a}"], a
    for k in range(2, b + 1):
        lines.append(f"{k}*{a}={acc}+{a}={acc + a}")
        acc += a
    return f"multiply {a}*{b}", lines, str(a * b)


def _gcd(rng, d):
    g = rng.choice({1: (1, 1, 2, 3, 4, 5), 2: (1, 2, 3, 5, 6, 7, 12), 3: (1, 2, 3, 4, 7, 9, 11, 13)}[d])
    hi = {1: 30, 2: 300, 3: 3000}[d] // g
    a, b = rng.randint(2, hi) * g, rng.randint(2, hi) * g
    lines, x, y = [], a, b
    while y:
        lines.append(f"{x} mod {y} = {x % y}")
        x, y = y, x % y
    return f"gcd {a} {b}", lines, str(x)


def _sort(rng, d):
    k = rng.randint(*{1: (3, 4), 2: (5, 6), 3: (7, 9)}[d])
    hi = 9 if d == 1 else 99
    items = [rng.randint(0, hi) for _ in range(k)]
    done, rest, lines = [], list(items), []
    while rest:
        m = min(rest)
        rest.remove(m)
        done.append(m)
        lines.append(" ".join(map(str, done)) + " |" + "".join(f" {v}" for v in rest))
    return "sort " + " ".join(map(str, items)), lines, " ".join(map(str, sorted(items)))


def _count(rng, d):
    n = rng.randint(*{1: (4, 6), 2: (9, 14), 3: (18, 28)}[d])
    letters = "abcde"[: 2 + d]
    seq = [rng.choice(letters) for _ in range(n)]
    q, c, parts = rng.choice(letters), 0, []
    for ch in seq:
        c += ch == q
        parts.append(f"{ch}{c}")
    return f"count {q} in {' '.join(seq)}", [" ".join(parts)], str(c)


def _calc_task(rng, d):
    hi = 99 if d == 1 else 30
    expr = acc = rng.randint(2, hi)
    calls = []
    for k in range(d):
        op, x = rng.choice("+-*"), rng.randint(2, hi)
        calls.append(_call("calc", f"{acc}{op}{x}"))
        acc = int(calls[-1].result)
        expr = f"{expr}{op}{x}" if k == 0 else f"({expr}){op}{x}"
    return f"use calc: {expr}", calls, str(acc)


def _lookup_task(rng, d):
    names = rng.sample(NAMES, d)
    calls = [_call("lookup", n) for n in names]
    if d == 1:
        return f"look up {names[0]}", calls, calls[0].result
    calls.append(_call("calc", "+".join(c.result for c in calls)))
    return "look up and add " + " ".join(names), calls, calls[-1].result


_GENERATORS = {"add": _add, "sub": _sub, "mul": _mul, "gcd": _gcd, "sort": _sort, "count": _count}


def make_task(kind: str, difficulty: int, rng: random.Random) -> Task:
    """One task of ``kind`` at ``difficulty`` drawn from ``rng``."""
    if kind not in KINDS or difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown kind/difficulty {kind!r}/{difficulty!r}")
    if kind in TOOL_KINDS:
        prompt, calls, answer = (_calc_task if kind == "calc" else _lookup_task)(rng, difficulty)
        work = "\n".join(c.call_text + c.result_text for c in calls)
        return Task(kind, difficulty, prompt, f"{work}\nanswer: {answer}", answer, list(calls))
    prompt, lines, answer = _GENERATORS[kind](rng, difficulty)
    return Task(kind, difficulty, prompt, "\n".join(lines + [f"answer: {answer}"]), answer, [])


def generate_tasks(n: int, seed: int, kinds=None, difficulties=None) -> list[Task]:
    """``n`` tasks, deterministic for ``seed``. ``kinds``/``difficulties`` restrict the draw;
    repeating an entry (``difficulties=[1, 1, 2]``) weights it."""
    kinds = list(kinds or KINDS)
    difficulties = list(difficulties or DIFFICULTIES)
    rng = random.Random(seed)
    return [make_task(rng.choice(kinds), rng.choice(difficulties), rng) for _ in range(n)]


# ----------------------------------------------------------------------------- checking

_ANSWER_RE = re.compile(r"answer:[ \t]*([^\n<]*)")


def _norm(s: str) -> str:
    return " ".join(s.split())


def parse_answer(text: str) -> str | None:
    """The value of the last ``answer:`` line in ``text`` (whitespace-normalised), or None."""
    found = _ANSWER_RE.findall(text)
    return _norm(found[-1]) if found else None


def check_answer(task: Task, completion_text: str) -> bool:
    """True when the completion's final ``answer:`` line equals the task's answer."""
    got = parse_answer(completion_text)
    return got is not None and got == _norm(task.answer)


# ----------------------------------------------------------------------------- rendering

def chat_messages(task: Task) -> list[dict]:
    """The OpenAI-style messages for the task (feed to ``tokenizer.apply_chat_template``)."""
    return [{"role": "user", "content": task.prompt}]


def prompt_text(task: Task) -> str:
    """The chat template applied to the prompt, with the generation prompt (``<|assistant|>``)."""
    return f"{USER}{task.prompt}\n{ASSISTANT}"


def training_text(task: Task) -> str:
    """Prompt + full target + EOS: the text a model is trained on."""
    return prompt_text(task) + task.target + EOS


def training_segments(task: Task) -> list[tuple[str, bool]]:
    """``training_text`` split into ``(text, trained)`` pieces: the prompt and every
    ``<result>...</result>`` span are not trained (they come from the user and the tool)."""
    segs: list[tuple[str, bool]] = [(prompt_text(task), False)]
    rest = task.target + EOS
    while (i := rest.find(RESULT_OPEN)) >= 0:
        j = rest.index(RESULT_CLOSE, i) + len(RESULT_CLOSE)
        segs += [(rest[:i], True), (rest[i:j], False)]
        rest = rest[j:]
    segs.append((rest, True))
    return [(t, m) for t, m in segs if t]


def length_stats(tasks: list[Task]) -> dict:
    """``{(kind, difficulty): (min, mean, max)}`` of target lengths in characters."""
    groups: dict = {}
    for t in tasks:
        groups.setdefault((t.kind, t.difficulty), []).append(len(t.target))
    return {k: (min(v), sum(v) / len(v), max(v)) for k, v in sorted(groups.items())}


if __name__ == "__main__":  # python -m vllm_ext.testbed.tasks: examples and length table
    for t in generate_tasks(8, seed=1, difficulties=[2]):
        print(f"--- {t.kind}/{t.difficulty}\n{training_text(t)}")
    for (k, d), (lo, mean, hi) in length_stats(generate_tasks(4000, seed=0)).items():
        print(f"{k:7s} d{d}  min {lo:4d}  mean {mean:6.1f}  max {hi:4d}")
