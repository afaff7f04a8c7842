"""Session keeping (vllm_ext.sched.sessions) against vLLM's own BlockPool, no engine."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from vllm_ext.config import ExtConfig, ExtConfigError
from vllm_ext.sched.sessions import FOLLOWUP_KEY, SessionKeeps
from vllm_ext.sched.step_cost import StepCostFit


class _Queue(list):
    def peek_request(self):
        return self[0]


def _sched(num_blocks=8, block_size=16):
    from vllm.v1.core.block_pool import BlockPool

    pool = BlockPool(num_blocks, True, block_size)
    owned: dict[str, list] = {}
    kvm = SimpleNamespace(block_pool=pool,
                          get_blocks=lambda rid: SimpleNamespace(blocks=(owned[rid],)))
    step = StepCostFit()
    return SimpleNamespace(kv_cache_manager=kvm, running=[], waiting=_Queue(),
                           ext_step_cost=step, block_size=block_size), owned


def _turn(sched, owned, rid, session, full=2, partial=1, status="FINISHED_STOPPED", stop=None,
          **xargs):
    """A finished request holding `full` hashed blocks and `partial` unhashed ones."""
    pool = sched.kv_cache_manager.block_pool
    blocks = pool.get_new_blocks(full + partial)
    for i, b in enumerate(blocks[:full]):
        b.set_block_hash(f"{rid}-{i}".encode())
    owned[rid] = blocks
    return SimpleNamespace(request_id=rid, session_id=session, num_computed_tokens=40,
                           num_tokens=41, status=SimpleNamespace(name=status),
                           sampling_params=SimpleNamespace(extra_args=xargs or None,
                                                           stop=stop)), blocks


def _vllm_free(sched, owned, rid):
    sched.kv_cache_manager.block_pool.free_blocks(reversed(owned.pop(rid)))


def _scheduled(*req_ids_computed):
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, num_computed_tokens=c)
                            for r, c in req_ids_computed],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], resumed_req_ids=set(),
                                              num_computed_tokens=[]))


def test_preserve_pins_full_blocks_until_the_followup_is_scheduled():
    sched, owned = _sched()
    pool = sched.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    keeps = SessionKeeps()
    request, blocks = _turn(sched, owned, "t1", "s", **{FOLLOWUP_KEY: 5.0})
    keeps.on_finish(sched, request, "preserve", None)
    _vllm_free(sched, owned, "t1")
    # the 2 full blocks stay referenced (not evictable), the partial one is free again
    assert [b.ref_cnt for b in blocks] == [1, 1, 0]
    assert pool.get_num_free_blocks() == free0 - 2
    assert keeps.to_dict()["pinned_blocks"] == 2 and keeps.counts["preserve"] == 1
    follow = SimpleNamespace(request_id="t2", session_id="s")
    keeps.on_arrival(sched, follow)
    assert keeps.gap_s is not None and keeps.gap_s < 5.0 and keeps.counts["followups"] == 1
    keeps.after_schedule(sched, _scheduled(("t2", 32)))
    assert (keeps.reused_tokens, keeps.recompute_tokens) == (32, 8)
    assert pool.get_num_free_blocks() == free0 and not keeps.pins
    assert keeps.sizes() == {"session_followups": 0, "session_followup_ids": 0}


def test_pins_expire_and_give_way_to_the_waiting_head():
    sched, owned = _sched(num_blocks=8)
    pool = sched.kv_cache_manager.block_pool
    keeps = SessionKeeps(keep_factor=1.0)
    r1, _ = _turn(sched, owned, "a", "s1", **{FOLLOWUP_KEY: 0.01})
    r2, _ = _turn(sched, owned, "b", "s2", **{FOLLOWUP_KEY: 60.0})
    keeps.on_finish(sched, r1, "preserve", None)
    keeps.on_finish(sched, r2, "preserve", None)
    _vllm_free(sched, owned, "a")
    _vllm_free(sched, owned, "b")
    assert keeps.to_dict()["pinned_blocks"] == 4
    time.sleep(0.02)
    keeps.before_schedule(sched)             # s1's deadline (1 x 0.01 s) has passed
    assert list(keeps.pins) == ["s2"] and keeps.counts["expired"] == 1
    # a waiting request needing every block: s2's pin gives way
    sched.waiting.append(SimpleNamespace(request_id="big", num_tokens=16 * 6))
    keeps.before_schedule(sched)
    assert not keeps.pins and keeps.counts["released_for_room"] == 1
    assert pool.get_num_free_blocks() == 7   # all but vLLM's null block


def test_lamps_rule_aborted_turns_swap_fallback_and_reset():
    sched, owned = _sched(num_blocks=32)
    keeps = SessionKeeps()
    # no gap known yet (no hint, nothing observed): vLLM's way
    request, blocks = _turn(sched, owned, "t1", "s")
    keeps.on_finish(sched, request, "lamps", None)
    _vllm_free(sched, owned, request.request_id)
    assert keeps.counts["discard"] == 1 and not keeps.pins
    # an unknown step cost prices nothing: preserve (the rule's tie-break), then measured
    # costs decide: a long gap against a cheap recompute discards
    keeps.reset(sched)
    request, _ = _turn(sched, owned, "t2", "s", **{FOLLOWUP_KEY: 0.5})
    keeps.on_finish(sched, request, "lamps", None)
    _vllm_free(sched, owned, request.request_id)
    assert keeps.counts["preserve"] == 1 and "s" in keeps.pins
    for tokens, seconds in ((1, 0.010), (64, 0.012), (256, 0.020), (8, 0.0105)) * 10:
        sched.ext_step_cost.add(tokens, seconds)
    assert sched.ext_step_cost.per_token_s > 0
    request, _ = _turn(sched, owned, "t3", "s", **{FOLLOWUP_KEY: 3600.0})
    keeps.on_finish(sched, request, "lamps", None)
    _vllm_free(sched, owned, request.request_id)
    assert keeps.counts["discard"] == 2 and "s" not in keeps.pins  # the older pin went too
    # aborted turns and requests without a session are left to vLLM
    request, _ = _turn(sched, owned, "t4", "s", status="FINISHED_ABORTED")
    keeps.on_finish(sched, request, "preserve", None)
    _vllm_free(sched, owned, request.request_id)
    request, _ = _turn(sched, owned, "t5", None)
    keeps.on_finish(sched, request, "preserve", None)
    _vllm_free(sched, owned, request.request_id)
    assert not keeps.pins and sum(keeps.counts[h] for h in ("preserve", "discard")) == 3
    # ... but a turn that ended at its stop string reaches the scheduler as an abort too
    # (vLLM 0.32): kept
    request, _ = _turn(sched, owned, "t4b", "s", status="FINISHED_ABORTED", stop=["</call>"])
    keeps.on_finish(sched, request, "preserve", None)
    _vllm_free(sched, owned, request.request_id)
    assert keeps.counts["preserve"] == 2 and "s" in keeps.pins
    keeps.release(sched, "s")
    # swap without a tier falls back to discard
    request, _ = _turn(sched, owned, "t6", "s2")
    keeps.on_finish(sched, request, "swap", None)
    _vllm_free(sched, owned, request.request_id)
    assert keeps.counts["discard"] == 3 and keeps.counts["swap"] == 0
    keeps.on_arrival(sched, SimpleNamespace(request_id="f", session_id="s2"))
    keeps.reset(sched)
    assert not keeps.finished and keeps.sizes() == {"session_followups": 0,
                                                    "session_followup_ids": 0}


def test_session_keep_flag_validation():
    assert ExtConfig().session_keep == "off"
    with pytest.raises(ExtConfigError, match="--ext-session-keep"):
        ExtConfig.from_dict({"session_keep": "always"})
    with pytest.raises(ExtConfigError, match="--ext-swap-dir"):
        ExtConfig().with_live_changes({"session_keep": "swap"})
    assert ExtConfig().with_live_changes({"session_keep": "lamps"}).session_keep == "lamps"


def test_a_live_config_change_releases_session_pins():
    """Pins were kept for the old settings; a benchmark block must not inherit them."""
    from test_policy import _adapter

    s, _ = _adapter([("a", 0, 10)])
    s.vllm_config.model_config = SimpleNamespace(hf_config=SimpleNamespace(model_type="none"),
                                                 model=None)
    calls = []
    s.ext_sessions.reset = lambda sched: calls.append(sched)
    s.ext_apply_config({"session_keep": "preserve"})
    s.ext_apply_config({"policy": "fcfs"})
    assert calls == [s, s] and s.ext_config.session_keep == "preserve"
