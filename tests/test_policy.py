"""Pure policy behaviour: ordering, victim choice, margin and preemption cap (no engine)."""
import math

from vllm_ext.sched.policy import FcfsPolicy, OraclePolicy, RequestView, make_policy


def view(rid, arrival, out=0, true_len=None, preempted=0):
    return RequestView(request_id=rid, arrival_time=arrival, num_prompt_tokens=5,
                       num_output_tokens=out, max_tokens=100, num_preemptions=preempted,
                       true_output_len=true_len)


def test_fcfs_never_reorders_or_preempts():
    p = FcfsPolicy()
    assert not p.reorders
    assert p.choose_victim(view("a", 0, true_len=1), [view("b", 0, true_len=99)]) is None


def test_oracle_orders_by_true_remaining_then_arrival():
    p = make_policy("oracle")
    views = [view("long", 0, true_len=50), view("short", 2, true_len=5),
             view("half", 1, out=40, true_len=50), view("tie", 3, true_len=5),
             view("unknown", -1)]
    order = [v.request_id for v in sorted(views, key=p.sort_key)]
    assert order == ["short", "tie", "half", "long", "unknown"]
    assert view("x", 0).true_remaining == math.inf


def test_oracle_victim_is_largest_remaining_and_respects_margin():
    p = OraclePolicy(margin=10)
    running = [view("r1", 0, true_len=30), view("r2", 0, true_len=80), view("r3", 0, true_len=50)]
    assert p.choose_victim(view("w", 1, true_len=5), running).request_id == "r2"
    assert p.choose_victim(view("w", 1, true_len=75), running) is None  # 75 + 10 >= 80


def test_oracle_preemption_cap():
    p = OraclePolicy(max_preemptions_per_request=2)
    running = [view("r1", 0, true_len=30), view("r2", 0, true_len=80, preempted=2)]
    assert p.choose_victim(view("w", 1, true_len=5), running).request_id == "r1"
    assert p.choose_victim(view("w", 1, true_len=5), running[1:]) is None
