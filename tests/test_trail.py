"""TRAIL pieces without an engine: bins, Bayesian smoothing, prompt model, policy rules."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_ext.sched.policy import RequestView
from vllm_ext.sched.trail import LengthBins, PromptModel, RemainingTracker, TrailPolicy

BINS = LengthBins((0.0, 10.0, 20.0, 40.0, 80.0))


def view(rid, arrival=0.0, out=0, preempted=0):
    return RequestView(rid, arrival, 5, out, 200, preempted)


def test_bins_make_and_index():
    b = LengthBins.make(np.arange(100), k=4, mode="equal", max_len=100)
    assert b.edges == (0.0, 25.0, 50.0, 75.0, 100.0)
    assert list(b.index([0, 24.9, 25, 99, 500])) == [0, 0, 1, 3, 3]
    q = LengthBins.make(np.r_[np.ones(90), np.arange(10) * 50], k=5, mode="quantile")
    assert q.edges[0] == 0 and list(q.edges) == sorted(set(q.edges))


@given(st.lists(st.floats(0.01, 1.0), min_size=4, max_size=4), st.integers(0, 30))
def test_shift_down_keeps_mass_and_moves_down(p, steps):
    q = np.array(p) / sum(p)
    out = BINS.shift(steps) @ q
    assert out.sum() == pytest.approx(1.0)
    assert out @ BINS.midpoints <= q @ BINS.midpoints + 1e-9
    # the per-token rule, applied step by step, equals the cached matrix power
    move, ref = 1.0 / np.maximum(BINS.widths, 1.0), q.copy()
    for _ in range(steps):
        nxt = ref * (1 - move)
        nxt[:-1] += ref[1:] * move[1:]
        nxt[0] += ref[0] * move[0]
        ref = nxt
    assert np.allclose(out, ref)


def test_tracker_counts_down_between_refinements():
    t = RemainingTracker(BINS, smoothing=True)
    t.observe([0, 0, 1, 0], generated=0)          # all mass in [20, 40): expected 30
    assert t.initial == 30 and t.remaining(0) == 30 and t.remaining(8) == 22
    assert t.remaining(100) == 1.0                # floored, never negative


def test_smoothing_combines_prior_and_new_observation():
    raw, smooth = RemainingTracker(BINS, smoothing=False), RemainingTracker(BINS, True)
    for t in (raw, smooth):
        t.observe([0, 0.5, 0.5, 0], generated=0)
        t.observe([0, 0, 0.5, 0.5], generated=1)
    assert raw.expected() == pytest.approx(0.5 * 30 + 0.5 * 60)
    # the prior puts no mass in [40, 80): the posterior concentrates on [20, 40)
    assert smooth.q[3] == pytest.approx(0.0) and smooth.q[2] > 0.9


def test_prompt_model_features_and_prediction():
    f = PromptModel.features([1, 2, 3, 3], buckets=8)
    assert f.shape == (10,) and f[0] == 1 and f[1] == pytest.approx(np.log1p(4))
    assert f[2:].sum() == pytest.approx(1.0)
    coef = np.zeros(10)
    coef[0] = 50
    assert PromptModel(tuple(coef), 8).predict([5]) == 50


def _policy(**kw):
    return TrailPolicy(bins=BINS, prompt_model=PromptModel(tuple([40.0] + [0.0] * 65)), **kw)


def test_trail_orders_by_predicted_remaining_and_falls_back_to_prompt():
    p = _policy()
    for rid in ("a", "b", "c"):
        p.on_arrival(rid, [1, 2])                 # prompt-only: 40 each
    p.observe("a", {"bin0": 1.0}, 0)              # -> 5
    p.observe("b", {"bin3": 1.0}, 0)              # -> 60
    views = [view("b", 0), view("c", 1), view("a", 2), view("unknown", -1)]
    assert [v.request_id for v in sorted(views, key=p.sort_key)] == ["a", "c", "b", "unknown"]


def test_trail_limited_preemption_and_margin_and_cap():
    p = _policy(preempt_fraction=0.8, margin=5, max_preemptions_per_request=1)
    p.observe("long", {"bin3": 1.0}, 0)           # initial 60: preemptible while out <= 48
    p.observe("short", {"bin0": 1.0}, 0)          # 5
    cand = view("short")
    assert p.choose_victim(cand, [view("long", out=10)]).request_id == "long"
    assert p.choose_victim(cand, [view("long", out=49)]) is None      # past c x initial
    assert p.choose_victim(cand, [view("long", out=10, preempted=1)]) is None  # cap
    p.observe("mid", {"bin1": 1.0}, 0)            # 15
    p.observe("mid2", {"bin1": 1.0}, 0)
    assert p.choose_victim(view("mid"), [view("mid2", out=0)]) is None  # 15 + 5 !< 15


def test_spjf_ignores_probe_refinement():
    p = _policy(refine=False)
    p.on_arrival("a", [1])
    p.observe("a", {"bin0": 1.0}, 0)
    assert p.name == "spjf" and p.remaining(view("a", out=10)) == 30
    p.forget("a")
    assert p.remaining(view("a")) == float("inf")


def test_predictions_are_capped_by_what_max_tokens_leaves():
    from dataclasses import replace

    p = _policy()
    p.observe("loop", {"bin3": 1.0}, 0)           # the probe says 60 more
    p.observe("other", {"bin2": 1.0}, 0)          # 30
    p.observe("x", {"bin0": 1.0}, 0)              # 5
    capped = replace(view("loop", out=20), max_tokens=30)  # but only 10 tokens are left
    assert p.remaining(capped) == 10 and p.initial(capped) == 30
    assert p.choose_victim(view("x"), [capped, view("other", out=1)]).request_id == "other"
    p.on_arrival("new", [1])                      # prompt-only 40, capped at 25
    assert p.remaining(replace(view("new"), max_tokens=25)) == 25


def test_starvation_bound_orders_overdue_first_and_protects_them():
    p = TrailPolicy(bins=LengthBins((0.0, 10.0, 100.0, 1000.0)), tail_factor=2.0,
                    tail_min_tokens=10.0, step_s=0.01)
    p.prompt_pred.update({"long": 300.0, "short": 5.0})

    def v(rid, now, out=0):
        return RequestView(rid, arrival_time=0.0 if rid == "long" else now - 0.01,
                           num_prompt_tokens=4, num_output_tokens=out, max_tokens=500, now=now)
    # the long request's bound: 2 x 300 tokens x 10 ms = 6 s after its arrival
    assert p.overdue_at(v("long", 0.0)) == pytest.approx(6.0)
    assert p.sort_key(v("short", 5.0)) < p.sort_key(v("long", 5.0))      # SRPT before the bound
    assert p.sort_key(v("long", 6.5)) < p.sort_key(v("short", 6.5))      # overdue goes first
    assert p.preemptible(v("long", 5.0)) and not p.preemptible(v("long", 6.5))
    assert p.choose_victim(v("short", 6.5), [v("long", 6.5)]) is None     # never preempted
    off = TrailPolicy(bins=p.bins, tail_factor=0.0, step_s=0.01, prompt_pred=p.prompt_pred)
    assert off.overdue_at(v("long", 0.0)) == float("inf")
    assert off.sort_key(v("short", 100.0)) < off.sort_key(v("long", 100.0))
