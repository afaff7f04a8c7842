"""LAMPS admission by predicted peak KV (`vllm_ext.sched.admission`)."""
from types import SimpleNamespace

from vllm.v1.core.sched.request_queue import FCFSRequestQueue

from vllm_ext.sched.admission import hold_back, offer_count, restore


def test_offer_count_charges_running_growth_and_each_candidates_peak():
    # 10 free blocks of 16 tokens; one running request at 40 tokens predicted to reach 72:
    # it will take 5 - 3 = 2 more blocks, leaving 8
    running = [(40, 32.0)]
    assert offer_count(10, 16, running, [(20, 44.0), (16, 48.0), (10, 6.0)]) == 2  # 4 + 4 fit
    assert offer_count(10, 16, running, [(100, 50.0), (10, 6.0)]) == 0  # 10 blocks: no room
    # order is kept: a small request does not slip past a large head
    assert offer_count(10, 16, running, [(100, 50.0), (1, 1.0), (1, 1.0)]) == 0
    # with nothing running the head is always offered (no stall), then the rule again
    assert offer_count(2, 16, [], [(100, 50.0), (1, 1.0)]) == 1
    assert offer_count(0, 16, [], []) == 0
    # an unbounded prediction never admits past a running request
    assert offer_count(10, 16, running, [(10, float("inf"))]) == 0


def _request(rid, tokens):
    return SimpleNamespace(request_id=rid, num_tokens=tokens)


def test_hold_back_and_restore_keep_the_queue_order():
    lengths = {"run": 32.0, "a": 10.0, "b": 300.0, "c": 5.0}
    sized = []
    waiting = FCFSRequestQueue()
    for rid in ("a", "b", "c"):
        waiting.add_request(_request(rid, 20))
    sched = SimpleNamespace(
        block_size=16, waiting=waiting, running=[_request("run", 40)],
        kv_cache_manager=SimpleNamespace(block_pool=SimpleNamespace(
            get_num_free_blocks=lambda: 10)),
        ext_policy=SimpleNamespace(remaining=lambda view: sized.append(view) or lengths[view]),
        view=lambda r: r.request_id)
    held = hold_back(sched)
    assert [r.request_id for r in sched.waiting] == ["a"]  # b's peak (20 blocks) does not fit
    assert [r.request_id for r in held] == ["b", "c"]
    assert sized == ["run", "a", "b"]  # the queue is sized only up to the first that stops
    sched.waiting.prepend_request(_request("preempted", 50))  # what vLLM may do meanwhile
    restore(sched, held)
    assert [r.request_id for r in sched.waiting] == ["preempted", "a", "b", "c"]
