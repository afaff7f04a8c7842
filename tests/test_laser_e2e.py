"""LASER in a CPU engine with the embedded model (each engine in its own process).

* ``moe_router=topk`` through the plugin (scheduler, worker, ExtConfig) gives the same tokens as
  stock vLLM with the plugin not loaded at all, and attaches nothing (no counters); with
  ``moe_track_load`` the tokens stay the same and the load comes back through the RPC.
* ``laser`` runs (eager and compiled), its load counters come back through
  ``ProbeWorker.ext_expert_load``, and on the near-flat gates of the testbed model it routes
  more evenly per step than top-k.
"""
import pytest

from conftest import run_engine_job

pytestmark = pytest.mark.e2e

PROMPTS = ["12+34=", "sort 3 1 2", "gcd 12 18", "hello", "count a in abca", "99-17="]
LOAD_RPC = [["ext_expert_load", {"ep_devices": 2}]]


def _spec(model_path, **over):
    reqs = [{"id": f"r{i}", "prompt": p, "max_tokens": 12, "ignore_eos": True}
            for i, p in enumerate(PROMPTS)]
    return {"model": model_path, "max_num_seqs": 8, "max_model_len": 256, "requests": reqs,
            **over}


def _ext(model_path, ext, **over):
    return _spec(model_path, scheduler="ext", worker="ext", ext=ext, rpc=LOAD_RPC, **over)


@pytest.fixture(scope="module")
def stock(model_path):
    return run_engine_job(_spec(model_path), env={"VLLM_PLUGINS": "none"})


@pytest.fixture(scope="module")
def tracked_topk(model_path):
    return run_engine_job(_ext(model_path, {"moe_router": "topk", "moe_track_load": True}))


def test_topk_is_bit_identical_to_stock_vllm(model_path, stock):
    ours = run_engine_job(_ext(model_path, {"moe_router": "topk"}))
    assert len(stock["token_ids"]) == len(PROMPTS)
    assert ours["token_ids"] == stock["token_ids"]
    assert ours["rpc"]["ext_expert_load"]["layers"] == []  # vLLM's routers, nothing attached


def test_tracked_topk_keeps_tokens_and_reports_load(stock, tracked_topk):
    assert tracked_topk["token_ids"] == stock["token_ids"]
    report = tracked_topk["rpc"]["ext_expert_load"]
    assert len(report["layers"]) == 4
    for layer in report["layers"]:
        assert layer["tokens"] > 0 and layer["moved_fraction"] == 0
        assert sum(layer["device_tokens"]) == pytest.approx(2 * layer["tokens"])


def _check_laser_report(report):
    assert len(report["layers"]) == 4 and report["ep_devices"] == 2
    for layer in report["layers"]:
        assert layer["tokens"] > 0 and layer["steps"] > 0
        assert sum(layer["device_tokens"]) == pytest.approx(2 * layer["tokens"])
    assert report["summary"]["moved_fraction"] > 0


@pytest.fixture(scope="module")
def laser_eager(model_path):
    return run_engine_job(_ext(model_path, {"moe_router": "laser"}))


def test_laser_runs_and_balances_load(laser_eager, tracked_topk):
    result = laser_eager
    assert all(len(t) == 12 for t in result["token_ids"].values())
    report = result["rpc"]["ext_expert_load"]
    _check_laser_report(report)
    topk = tracked_topk["rpc"]["ext_expert_load"]["summary"]
    assert report["summary"]["step_max_over_mean"] < topk["step_max_over_mean"]


def test_laser_compiled_counts_inside_the_graph_and_matches_eager(model_path, laser_eager):
    result = run_engine_job(_ext(model_path, {"moe_router": "laser"},
                                 llm_kwargs={"enforce_eager": False}))
    assert all(len(t) == 12 for t in result["token_ids"].values())
    _check_laser_report(result["rpc"]["ext_expert_load"])
    # the compiled graph routes as the eager code does (measured: 70 of 72 tokens equal, the
    # rest from float differences between the graphs) and its counters see the same passes:
    # before the worker reset them after vLLM's warm-up, the compiled engine's counters held
    # its dummy compile batches (flat fraction 0.99 vs 0.81) and only 28 of 72 tokens matched
    same = sum(a == b for rid, toks in result["token_ids"].items()
               for a, b in zip(toks, laser_eager["token_ids"][rid]))
    assert same >= 0.9 * sum(len(t) for t in result["token_ids"].values())
    compiled = result["rpc"]["ext_expert_load"]["summary"]
    eager = laser_eager["rpc"]["ext_expert_load"]["summary"]
    for key in ("flat_fraction", "moved_fraction"):
        assert compiled[key] == pytest.approx(eager[key], abs=0.03), key
