"""Property tests for the synthetic task suite (vllm_ext.testbed.tasks)."""
from __future__ import annotations

import math
import random
import re
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_ext.testbed import tasks as T

seeds = st.integers(min_value=0, max_value=2**32 - 1)
kinds = st.sampled_from(T.KINDS)
levels = st.sampled_from(T.DIFFICULTIES)


@pytest.fixture(scope="module")
def tok():
    from vllm_ext.testbed.tokenizer import build_tokenizer

    return build_tokenizer()


@settings(max_examples=50, deadline=None)
@given(seed=seeds, n=st.integers(1, 30))
def test_deterministic_for_seed(seed, n):
    assert T.generate_tasks(n, seed) == T.generate_tasks(n, seed)
    assert T.generate_tasks(n, seed)[: n - 1] == T.generate_tasks(n - 1, seed)


def test_different_seeds_differ():
    assert T.generate_tasks(20, 0) != T.generate_tasks(20, 1)


@settings(max_examples=50, deadline=None)
@given(seed=seeds, kind=kinds, d=levels)
def test_restrictions_respected(seed, kind, d):
    for t in T.generate_tasks(5, seed, kinds=[kind], difficulties=[d]):
        assert (t.kind, t.difficulty) == (kind, d)
        assert (len(t.tool_calls) > 0) == (kind in T.TOOL_KINDS)


@settings(max_examples=300, deadline=None)
@given(seed=seeds, kind=kinds, d=levels)
def test_checker_accepts_target_rejects_wrong(seed, kind, d):
    t = T.make_task(kind, d, random.Random(seed))
    assert T.check_answer(t, t.target)
    assert T.check_answer(t, t.target + T.EOS)
    assert T.check_answer(t, f"answer: {t.answer}")
    assert T.parse_answer(t.target) == t.answer
    body = t.target.rsplit("answer:", 1)[0]
    wrong = t.answer + "1" if kind != "sort" else t.answer + " 1"
    assert not T.check_answer(t, body + f"answer: {wrong}")
    assert not T.check_answer(t, body)  # no answer line
    assert not T.check_answer(t, "")


@settings(max_examples=300, deadline=None)
@given(seed=seeds, kind=kinds, d=levels)
def test_answers_are_correct(seed, kind, d):
    t = T.make_task(kind, d, random.Random(seed))
    p = t.prompt.split()
    if kind in ("add", "sub", "mul"):
        a, op, b = re.split(r"([-+*])", p[-1])
        assert int(t.answer) == {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}[op](int(a), int(b)) >= 0
    elif kind == "gcd":
        assert int(t.answer) == math.gcd(int(p[1]), int(p[2]))
    elif kind == "sort":
        assert t.answer.split() == [str(v) for v in sorted(map(int, p[1:]))]
    elif kind == "count":
        assert int(t.answer) == p[3:].count(p[1])
    elif kind == "calc":
        assert t.answer == T.run_tool("calc " + t.prompt.split(": ", 1)[1])
    elif kind == "lookup":
        names = p[2:] if d == 1 else p[4:]
        assert int(t.answer) == sum(T.lookup_value(n) for n in names)


@settings(max_examples=200, deadline=None)
@given(seed=seeds, kind=st.sampled_from(T.TOOL_KINDS), d=levels)
def test_tool_results_correct_and_in_target(seed, kind, d):
    t = T.make_task(kind, d, random.Random(seed))
    for c in t.tool_calls:
        # expected result computed without the tool: Python's own integer arithmetic, or the
        # table's documented rule (crc32 of the name, 100..9999)
        expected = (str(eval(c.arg, {"__builtins__": {}})) if c.tool == "calc"
                    else str(100 + zlib.crc32(c.arg.encode()) % 9900))
        assert c.result == expected
        assert T.run_tool(c.call_text) == expected == T.run_tool(f"{c.tool} {c.arg}")
        assert c.call_text + c.result_text in t.target
        assert T.tool_latency(c.call_text) == {"calc": 0.05, "lookup": 0.8}[c.tool]
        assert not c.result.startswith("error")
        assert T.pending_call(t.target[: t.target.index(c.call_text) + len(c.call_text)]) == c.call_text
    assert T.parse_call(t.tool_calls[-1].call_text)[0] in T.TOOLS


@given(a=st.integers(-10**6, 10**6), b=st.integers(-10**6, 10**6))
def test_calc_tool(a, b):
    assert T.run_tool(f"<call>calc {a}*{b}</call>") == str(a * b)
    assert T.run_tool(f"calc ({a}+{b})-3") == str(a + b - 3)
    if b:
        assert T.run_tool(f"calc {a}//{b}") == str(a // b)


def test_tool_errors_and_latency():
    assert T.run_tool("calc 1/0").startswith("error")
    assert T.run_tool("calc 1//0").startswith("error")
    assert T.run_tool("calc __import__('os')").startswith("error")
    assert T.run_tool("calc 2**10").startswith("error")
    assert T.run_tool("lookup nobody").startswith("error")
    assert T.run_tool("shell ls").startswith("error")
    assert T.TOOLS["lookup"].latency_s > T.TOOLS["calc"].latency_s
    name = T.NAMES[7]
    assert T.run_tool(f"lookup {name}") == str(T.lookup_value(name))
    assert T.pending_call("abc") is None


@settings(max_examples=100, deadline=None)
@given(seed=seeds)
def test_tokenizer_round_trip_and_segments(tok, seed):
    for t in T.generate_tasks(8, seed):
        text = T.training_text(t)
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        segs = T.training_segments(t)
        assert "".join(s for s, _ in segs) == text
        assert sum((tok.encode(s, add_special_tokens=False) for s, _ in segs), []) == ids
        untrained = "".join(s for s, m in segs if not m)
        assert untrained == T.prompt_text(t) + "".join(c.result_text for c in t.tool_calls)


def test_prompt_matches_chat_template(tok):
    for t in T.generate_tasks(16, 5):
        rendered = tok.apply_chat_template(T.chat_messages(t), tokenize=False, add_generation_prompt=True)
        assert rendered == T.prompt_text(t)


def test_lengths_span_and_grow_with_difficulty(tok):
    ts = T.generate_tasks(1600, seed=0)
    ntok = [len(tok.encode(t.target, add_special_tokens=False)) for t in ts]
    assert min(ntok) >= 15 and max(ntok) <= 320
    assert min(ntok) <= 30 and max(ntok) >= 200
    for kind in T.KINDS:
        means = []
        for d in T.DIFFICULTIES:
            v = [n for t, n in zip(ts, ntok) if (t.kind, t.difficulty) == (kind, d)]
            assert v, (kind, d)
            means.append(sum(v) / len(v))
        assert means[0] < means[1] < means[2], (kind, means)


def test_gcd_length_not_fixed_by_digits():
    steps = {t.target.count("\n") for t in T.generate_tasks(300, 0, kinds=["gcd"], difficulties=[3])}
    assert len(steps) >= 4
