"""The swap tier's engine side without an engine: the scheduler's bookkeeping (SwapIndex and
SwapConnector's scheduler methods, as vLLM's Scheduler calls them), the worker's block I/O on
CPU tensors in the CPU and GPU KV layouts, the pause handling's swap path and its fallback,
and the CLI / config checks."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from vllm_ext.config import ExtConfig, ExtConfigError
from vllm_ext.swap.tier import SwapIndex


# ---- SwapIndex (pure) ---------------------------------------------------------------------
def test_swap_out_match_load_plan_order():
    ix = SwapIndex(capacity=8, block_size=4, block_bytes=64)
    assert ix.swap_out([b"a", b"b", b"c"], [10, 11, 12]) == 3
    assert ix.has_pending() and len(ix) == 3
    # a queued save already counts as a hit (the worker saves before it loads in a step)
    assert ix.match([b"a", b"b", b"c", b"d"], 0) == 3
    assert ix.match([b"a", b"b", b"c"], 1) == 2
    assert ix.match([b"a", b"x", b"c"], 0) == 1          # a run, not a set
    assert ix.match([b"a", b"b", b"c"], 0, limit=2) == 2
    assert ix.plan_load([b"a", b"b"], [3, 4]) == 2
    plan = ix.take_plan()
    assert plan.saves == [(b"a", 10), (b"b", 11), (b"c", 12)]
    assert plan.loads == [(b"a", 3), (b"b", 4)] and plan.deletes == [] and not plan.reset
    assert not ix.has_pending() and not ix.take_plan()
    c = ix.counters
    assert (c.blocks_saved, c.blocks_loaded, c.tokens_loaded, c.swap_outs) == (3, 2, 8, 1)
    # stored keys are only refreshed, not saved again
    assert ix.swap_out([b"a", b"z"], [1, 2]) == 2
    assert ix.take_plan().saves == [(b"z", 2)] and ix.counters.blocks_reused == 1


def test_capacity_evicts_lru_and_drops_unsent_saves():
    ix = SwapIndex(capacity=2, block_size=4)
    ix.swap_out([b"a", b"b"], [1, 2])
    ix.take_plan()
    ix.match([b"a"], 0)
    ix.plan_load([b"a"], [7])           # a is used: b is now least recent
    ix.take_plan()
    ix.swap_out([b"c"], [3])
    plan = ix.take_plan()
    assert plan.deletes == [b"b"] and plan.saves == [(b"c", 3)]
    assert b"a" in ix and b"c" in ix and b"b" not in ix
    # evicting a key whose save no step has carried yet drops the save, sends no delete
    ix2 = SwapIndex(capacity=1, block_size=4)
    ix2.swap_out([b"x"], [1])
    ix2.swap_out([b"y"], [2])
    plan = ix2.take_plan()
    assert plan.saves == [(b"y", 2)] and plan.deletes == []
    assert ix2.counters.evictions == 1 and ix2.counters.blocks_saved == 1


def test_forget_reset_disable_and_cost():
    ix = SwapIndex(capacity=8, block_size=4, block_bytes=4000)
    ix.swap_out([b"a", b"b"], [1, 2])
    ix.take_plan()
    ix.forget([b"b"], failed="save")
    assert ix.match([b"a", b"b"], 0) == 1 and ix.counters.save_failures == 1
    assert ix.s_per_token() is None                       # nothing measured, no prior
    assert ix.s_per_token(prior_mb_s=1.0) == pytest.approx(4000 / 4 / 1e6)
    ix.observe(save_s=1.0, save_bytes=2000, load_s=0.0, load_bytes=0)
    assert ix.s_per_token(prior_mb_s=1.0) == pytest.approx(4000 / 4 / 1e6)  # one side only
    ix.observe(save_s=0.0, save_bytes=0, load_s=1.0, load_bytes=2000)
    assert ix.s_per_token() == pytest.approx(1000 / 2000)  # harmonic mean of both
    ix.reset()
    assert len(ix) == 0 and ix.take_plan().reset
    ix.disable("store gone")
    assert ix.swap_out([b"a"], [1]) == 0 and ix.match([b"a"], 0) == 0
    assert ix.s_per_token(prior_mb_s=1.0) is None
    assert ix.to_dict()["disabled_reason"] == "store gone"


# ---- SwapConnector, scheduler side ---------------------------------------------------------
def _configs(tmp_path, block_size=4, num_blocks=16, prefix=True, groups=1, **ext):
    from vllm.config import KVTransferConfig
    from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec,
                                            KVCacheTensor)

    from vllm_ext.swap.connector import kv_transfer_config

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=2, head_size=8,
                             dtype=torch.bfloat16)
    page = spec.page_size_bytes
    kv_cfg = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[KVCacheTensor(size=2 * page * num_blocks, layers=["l0", "l1"],
                                        layer_stride=page * num_blocks, block_stride=page)],
        kv_cache_groups=[KVCacheGroupSpec(["l0", "l1"], spec)] * groups)
    vllm_cfg = SimpleNamespace(
        kv_transfer_config=KVTransferConfig(**kv_transfer_config()),
        cache_config=SimpleNamespace(block_size=block_size, enable_prefix_caching=prefix,
                                     prefix_match_unit=None),
        parallel_config=SimpleNamespace(decode_context_parallel_size=1, world_size=1),
        additional_config={"vllm_ext": {"swap_dir": str(tmp_path), **ext}})
    return vllm_cfg, kv_cfg, page


def _scheduler_connector(tmp_path, **kw):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from vllm_ext.swap.connector import SwapConnector

    vllm_cfg, kv_cfg, page = _configs(tmp_path, **kw)
    return SwapConnector(vllm_cfg, KVConnectorRole.SCHEDULER, kv_cfg), page


def _request(req_id, computed, tokens, hashes):
    return SimpleNamespace(request_id=req_id, num_computed_tokens=computed,
                           num_tokens=tokens, block_hashes=list(hashes))


class _Blocks:
    def __init__(self, ids):
        self.ids = ids

    def get_block_ids(self):
        return (list(self.ids),)


def test_connector_swap_out_then_match_beyond_local_hit(tmp_path):
    from vllm_ext.swap.connector import SwapConnectorMetadata, SwapWorkerMeta

    conn, page = _scheduler_connector(tmp_path, swap_gib=0.001)
    assert conn.enabled and conn.index.block_bytes == 2 * page and conn.requires_kv_delivery is False
    assert conn.index.capacity == (2**30 // 1000) // 4096
    hashes = [b"h0", b"h1", b"h2", b"h3"]
    # paused with 14 computed tokens of block size 4: 3 full blocks go to the tier
    paused = _request("r", 14, 15, hashes)
    assert conn.swap_out(paused, [5, 6, 7, 8]) == 12
    assert conn.has_pending_push_work()          # keeps an idle engine stepping to save
    meta = conn.build_connector_meta(None)
    assert isinstance(meta, SwapConnectorMetadata)
    assert meta.plan.saves == [(b"h0", 5), (b"h1", 6), (b"h2", 7)]
    assert not conn.has_pending_push_work()
    # resumed: 20 tokens now (the tool result), local prefix-cache hit of 1 block
    resumed = _request("r", 0, 20, hashes + [b"h4"])
    assert conn.get_num_new_matched_tokens(resumed, 4) == (8, False)   # blocks 1, 2
    assert conn.get_num_new_matched_tokens(resumed, 4) == (8, False)   # side-effect free
    conn.update_state_after_alloc(resumed, _Blocks([30, 31, 32, 33, 34]), 8)
    plan = conn.build_connector_meta(None).plan
    assert plan.loads == [(b"h1", 31), (b"h2", 32)] and plan.saves == []
    # nothing matched -> nothing planned; 0 external tokens -> no load either
    other = _request("o", 0, 9, [b"zz", b"h1"])
    assert conn.get_num_new_matched_tokens(other, 0) == (0, False)
    conn.update_state_after_alloc(other, _Blocks([1, 2, 3]), 0)
    assert not conn.build_connector_meta(None).plan
    # never the whole prompt: vLLM must compute at least one token itself
    exact = _request("e", 0, 12, hashes[:3])
    assert conn.get_num_new_matched_tokens(exact, 0) == (8, False)
    # a worker's report: failed loads are forgotten, a broken store turns the tier off
    out = SimpleNamespace(kv_connector_worker_meta=SwapWorkerMeta(
        {"failed_loads": [b"h2"], "save_s": 0.5, "save_bytes": 100}))
    conn.update_connector_output(out)
    assert conn.get_num_new_matched_tokens(resumed, 4) == (4, False)
    stats = conn.stats()
    assert stats["load_failures"] == 1 and stats["save_bytes"] == 100
    assert (stats["blocks_loaded"], stats["tokens_loaded"], stats["tokens_failed"]) == (1, 4, 4)
    conn.update_connector_output(SimpleNamespace(
        kv_connector_worker_meta=SwapWorkerMeta({"broken": "StoreFileMissing: gone"})))
    assert not conn.enabled and conn.swap_out(paused, [5, 6, 7, 8]) == 0
    assert conn.get_num_new_matched_tokens(resumed, 4) == (0, False)
    assert conn.request_finished(resumed, []) == (False, None)


def test_reset_of_an_empty_tier_reaches_the_workers(tmp_path):
    # an empty SwapIndex is falsy (len 0): its plan must still be taken, or
    # has_pending_push_work stays true and the engine never idles (a drain never ends)
    conn, _ = _scheduler_connector(tmp_path)
    assert conn.reset_cache() and conn.has_pending_push_work()
    assert conn.build_connector_meta(None).plan.reset
    assert not conn.has_pending_push_work()


def test_connector_turns_itself_off_where_it_cannot_work(tmp_path):
    conn, _ = _scheduler_connector(tmp_path, prefix=False)
    assert not conn.enabled and "prefix caching" in conn.stats()["disabled_reason"]
    conn, _ = _scheduler_connector(tmp_path, groups=2)
    assert not conn.enabled and "one KV cache group" in conn.stats()["disabled_reason"]


def test_worker_meta_aggregates_across_workers():
    from vllm_ext.swap.connector import SwapWorkerMeta

    a = SwapWorkerMeta({"failed_saves": [b"x"], "save_s": 1.0, "save_bytes": 10})
    b = SwapWorkerMeta({"failed_loads": [b"y"], "save_s": 2.0, "save_bytes": 5, "broken": "e"})
    r = a.aggregate(b).report
    assert r["failed_saves"] == [b"x"] and r["failed_loads"] == [b"y"]
    assert r["save_s"] == 2.0 and r["save_bytes"] == 15 and r["broken"] == "e"


# ---- worker side on CPU tensors --------------------------------------------------------------
def _cpu_layout(num_blocks=6, heads=2, bs=4, hd=8, layers=2):
    """The CPU backend's cache: [blocks, kv_heads, block_size, 2 * head] bf16 per layer, all
    layers in one allocation, layer-outermost (as vLLM 0.32 places it on CPU)."""
    page = heads * bs * 2 * hd * 2
    backing = torch.randn(layers * num_blocks * heads * bs * 2 * hd).to(torch.bfloat16)
    caches = {f"l{i}": backing[i * num_blocks * page // 2:(i + 1) * num_blocks * page // 2]
              .view(num_blocks, heads, bs, 2 * hd) for i in range(layers)}
    tensors = [SimpleNamespace(layers=list(caches), layer_stride=page * num_blocks,
                               block_stride=page, offset=0)]
    return caches, SimpleNamespace(num_blocks=num_blocks, kv_cache_tensors=tensors)


def _gpu_like_layout(num_blocks=6, heads=2, bs=4, hd=8, layers=2):
    """A [2, blocks, block_size, heads, head] cache per layer (K and V halves outermost)."""
    half = bs * heads * hd * 2
    caches = {f"l{i}": torch.randn(2, num_blocks, bs, heads, hd).to(torch.bfloat16)
              for i in range(layers)}
    tensors = [SimpleNamespace(layers=[n], layer_stride=2 * half * num_blocks,
                               block_stride=half, offset=0) for n in caches]
    return caches, SimpleNamespace(num_blocks=num_blocks, kv_cache_tensors=tensors)


def _block(caches, b, gpu_like):
    return [c[:, b].clone() if gpu_like else c[b].clone() for c in caches.values()]


@pytest.mark.parametrize("gpu_like", [False, True])
def test_blocks_round_trip_through_the_store(tmp_path, gpu_like):
    from vllm_ext.swap.kv_io import BlockRegions, BlockSwapper
    from vllm_ext.swap.tier import SwapPlan

    caches, cfg = (_gpu_like_layout if gpu_like else _cpu_layout)()
    regions = BlockRegions(caches, cfg)
    assert len(regions.regions) == (4 if gpu_like else 2)
    assert regions.block_bytes == 2 * 2 * 4 * 2 * 8 * 2
    swapper = BlockSwapper(regions, str(tmp_path / "s.slots"), num_slots=8, max_in_flight=2)
    want = {b: _block(caches, b, gpu_like) for b in (1, 2)}
    swapper.run_saves(SwapPlan(saves=[(b"k1", 1), (b"k2", 2)]))
    for c in caches.values():   # the blocks are reused and overwritten at once
        c.zero_()
    swapper.run_loads(SwapPlan(loads=[(b"k1", 4), (b"k2", 5)]))
    for src, dst in ((1, 4), (2, 5)):
        for got, exp in zip(_block(caches, dst, gpu_like), want[src]):
            assert torch.equal(got, exp)
    assert all(t.abs().sum() == 0 for t in _block(caches, 0, gpu_like))  # nothing else written
    report = swapper.collect()
    assert report["save_bytes"] == 2 * regions.block_bytes and report["load_bytes"] > 0
    assert not report["failed_saves"] and not report["failed_loads"] and not report["broken"]
    # a key never saved: reported, its block listed for vLLM to recompute, nothing raised
    swapper.run_loads(SwapPlan(loads=[(b"nope", 3)]))
    assert swapper.take_failed_blocks() == {3} and swapper.collect()["failed_loads"] == [b"nope"]
    swapper.close()
    assert not os.path.exists(tmp_path / "s.slots")


def test_stale_store_bytes_are_refused_and_a_missing_store_breaks_the_tier(tmp_path):
    from vllm_ext.swap.kv_io import BlockRegions, BlockSwapper
    from vllm_ext.swap.tier import SwapPlan

    caches, cfg = _cpu_layout()
    path = str(tmp_path / "s.slots")
    first = BlockSwapper(BlockRegions(caches, cfg), path, num_slots=4, max_in_flight=1)
    first.run_saves(SwapPlan(saves=[(b"k", 1)]))
    first.collect()
    first.store.get(b"k").result()
    old = open(path, "rb").read()           # an earlier process's store, slot for slot
    first.store.remove_on_close = False
    first.close()
    second = BlockSwapper(BlockRegions(caches, cfg), path, num_slots=4, max_in_flight=1)
    second.run_saves(SwapPlan(saves=[(b"k", 1)]))
    second.store.get(b"k").result()
    with open(path, "r+b") as f:            # same inode, the old bytes back in place
        f.write(old)
    before = caches["l0"][3].clone()
    second.run_loads(SwapPlan(loads=[(b"k", 3)]))
    assert second.take_failed_blocks() == {3} and torch.equal(caches["l0"][3], before)
    assert second.collect()["failed_loads"] == [b"k"]
    os.unlink(path)                          # the store's file disappears: tier broken
    second.run_saves(SwapPlan(saves=[(b"j", 2)]))
    report = second.collect()
    assert report["broken"].startswith("StoreFileMissing") and report["failed_saves"] == [b"j"]
    second.run_loads(SwapPlan(loads=[(b"j", 2)]))
    assert second.take_failed_blocks() == {2}
    second.close()


# ---- the pause's swap path (vllm_ext.sched.pauses) with a fake scheduler --------------------
def _fake_sched(connector):
    from vllm.v1.request import RequestStatus

    from vllm_ext.sched.step_cost import StepCostFit

    request = SimpleNamespace(request_id="r", status=RequestStatus.WAITING_FOR_STREAMING_REQ,
                              num_computed_tokens=14, num_tokens=15,
                              block_hashes=[b"h0", b"h1", b"h2", b"h3"])
    freed = []
    manager = SimpleNamespace(free=freed.append,
                              get_block_ids=lambda req_id: ([5, 6, 7, 8],))
    sched = SimpleNamespace(requests={"r": request}, running=[], ext_step_cost=StepCostFit(),
                            kv_cache_manager=manager, num_waiting_for_streaming_input=1,
                            connector=connector)
    return sched, request, freed


def test_pause_swaps_full_blocks_and_falls_back_to_discard(tmp_path, caplog):
    from vllm_ext.sched.pauses import ToolPauses

    conn, _ = _scheduler_connector(tmp_path)
    sched, request, freed = _fake_sched(conn)
    pauses = ToolPauses(sessions={"s": "r"})
    done = pauses.pause(sched, "s", "lookup", 1.0, "swap")
    assert done["handling"] == "swap" and freed == [request] and "r" in pauses.discarded
    assert sched.num_waiting_for_streaming_input == 0
    assert [k for k, _ in conn.build_connector_meta(None).plan.saves] == [b"h0", b"h1", b"h2"]
    assert pauses.resumed(sched, request) and pauses.resuming == {"r": 14}
    pauses.after_schedule(SimpleNamespace(scheduled_new_reqs=[
        SimpleNamespace(req_id="r", num_computed_tokens=12)], scheduled_cached_reqs=SimpleNamespace(
            req_ids=[], resumed_req_ids=set(), num_computed_tokens=[])))
    assert (pauses.recompute_tokens, pauses.reused_tokens) == (2, 12) and not pauses.resuming
    # no tier (plain connector-less engine): discard, logged once, counted
    sched, request, freed = _fake_sched(None)
    pauses = ToolPauses(sessions={"s": "r"})
    with caplog.at_level("WARNING", logger="vllm_ext.swap"):
        assert pauses.pause(sched, "s", "lookup", 1.0, "swap")["handling"] == "discard"
    assert freed == [request] and pauses.swap_fallbacks == 1
    assert "falls back to discard" in caplog.text and pauses.counts["discard"] == 1


def test_min_waste_offers_swap_only_with_the_tier(tmp_path):
    from vllm_ext.sched.lamps import PauseCosts, choose_handling

    long_call = dict(context_tokens=100, call_s=10.0, recompute_s_per_token=1e-3,
                     batch_tokens=50)
    assert choose_handling(PauseCosts(**long_call)) == "discard"       # no tier: no swap
    assert choose_handling(PauseCosts(**long_call, swap_s_per_token=1e-6)) == "swap"
    conn, _ = _scheduler_connector(tmp_path)
    assert conn.swap_s_per_token() == pytest.approx(
        conn.index.block_bytes / 4 / 500e6)                             # the prior
    conn.index.disable("x")
    assert conn.swap_s_per_token() is None


# ---- configuration and CLI -----------------------------------------------------------------
def test_swap_handling_needs_the_tier():
    with pytest.raises(ExtConfigError, match="--ext-tool-handling swap.*--ext-swap-dir"):
        ExtConfig(tool_handling="swap").check_swap()
    assert ExtConfig(tool_handling="swap", swap_dir="/tmp").check_swap().tool_handling == "swap"
    live = ExtConfig(swap_dir="/tmp").with_live_changes({"tool_handling": "swap"})
    assert live.tool_handling == "swap"
    with pytest.raises(ExtConfigError, match="--ext-swap-dir"):
        ExtConfig().with_live_changes({"tool_handling": "swap"})
    with pytest.raises(ExtConfigError, match="--ext-swap-depth"):
        ExtConfig(swap_dir="/tmp", swap_depth=0)


def test_cli_adds_the_connector_and_names_the_flags(tmp_path, capsys, monkeypatch):
    import json

    from vllm_ext import cli

    ran = []
    monkeypatch.setattr(cli, "run_vllm_server", ran.append)
    cli.serve(["--ext-swap-dir", str(tmp_path), "--ext-tool-handling", "swap"])
    argv = ran[0]
    kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert kv["kv_connector"] == "SwapConnector"
    assert kv["kv_connector_module_path"] == "vllm_ext.swap.connector"
    assert kv["kv_role"] == "kv_both" and kv["kv_load_failure_policy"] == "recompute"
    ext = json.loads(argv[argv.index("--additional-config") + 1])["vllm_ext"]
    assert ext["swap_dir"] == str(tmp_path) and ext["tool_handling"] == "swap"
    for argv, words in (
            (["--ext-tool-handling", "swap"], "--ext-swap-dir"),
            (["--ext-swap-dir", str(tmp_path / "none")], "not a writable directory"),
            (["--ext-swap-dir", str(tmp_path), "--kv-transfer-config", "{}"],
             "drop --kv-transfer-config")):
        with pytest.raises(SystemExit):
            cli.serve(argv)
        assert words in capsys.readouterr().err
    cli.serve(["--ext-tool-handling", "discard"])
    assert "--kv-transfer-config" not in ran[-1]


# ---- preemption (--ext-preempt-mode) -------------------------------------------------------
def test_preempted_victim_swaps_full_blocks_and_its_return_is_counted(tmp_path):
    from vllm_ext.sched.preempt_swap import PreemptReturns

    conn, _ = _scheduler_connector(tmp_path)
    sched, request, _ = _fake_sched(conn)
    returns = PreemptReturns()
    returns.on_preempt(sched, request, "swap", conn)
    assert (returns.swapped, returns.swapped_tokens) == (1, 12)
    assert [k for k, _ in conn.build_connector_meta(None).plan.saves] == [b"h0", b"h1", b"h2"]
    # it returns as a resumed request (vLLM's v1 runner): 12 tokens found computed of 14
    cached = SimpleNamespace(req_ids=["x", "r"], resumed_req_ids={"r"},
                             num_computed_tokens=[40, 12])
    returns.after_schedule(SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached))
    assert (returns.recompute_tokens, returns.reused_tokens) == (2, 12) and not returns.context
    # recompute mode: nothing is saved, the return is still measured (as a new request)
    returns.on_preempt(sched, request, "recompute", conn)
    assert returns.swapped == 1 and not conn.build_connector_meta(None).plan
    returns.after_schedule(SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id="r", num_computed_tokens=0)],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], resumed_req_ids=set(),
                                              num_computed_tokens=[])))
    assert returns.recompute_tokens == 2 + 14
    # a victim that finishes (aborted) while waiting leaves nothing behind
    returns.on_preempt(sched, request, "recompute", conn)
    returns.forget("r")
    assert not returns.context
    # swap without a tier: recompute, logged once (a handler on the logger itself: once the
    # plugin has registered, caplog can see a record twice in the full suite)
    import logging

    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("vllm_ext.swap")
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        returns.on_preempt(sched, request, "swap", None)
        returns.on_preempt(sched, request, "swap", None)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert sum("falls back to recompute" in m for m in seen) == 1 and returns.swapped == 1


def test_preempt_mode_swap_needs_the_tier_and_is_live():
    with pytest.raises(ExtConfigError, match="--ext-preempt-mode swap.*--ext-swap-dir"):
        ExtConfig(preempt_mode="swap").check_swap()
    with pytest.raises(ExtConfigError, match="--ext-preempt-mode"):
        ExtConfig(preempt_mode="disk")
    live = ExtConfig(swap_dir="/tmp").with_live_changes({"preempt_mode": "swap"})
    assert live.preempt_mode == "swap"
    with pytest.raises(ExtConfigError, match="--ext-swap-dir"):
        ExtConfig().with_live_changes({"preempt_mode": "swap"})
