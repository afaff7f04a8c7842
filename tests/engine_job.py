"""Run one seeded batch through a vLLM engine and print what happened as JSON (last line).

Used by the e2e tests in a subprocess, so each engine gets a clean process:
    python tests/engine_job.py '<json spec>'
Spec keys: model, scheduler ("stock" | "ext"), ext (ExtConfig dict), worker ("stock" | "ext"),
max_num_seqs, num_blocks, block_size, requests [{id, prompt, max_tokens, xargs,
ignore_eos, after_step}], rpc_tags (tags whose predictions to read back), inspect_scheduler,
llm_kwargs (extra `LLM(...)` kwargs, override the defaults), rpc ([[method, kwargs], ...]
worker RPCs called after the run; rank 0's answers come back under "rpc", keyed by method).
Requests are added at the step given by `after_step` (default 0), so arrival order is exact.
"""
from __future__ import annotations

import json
import sys


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = dict(model=spec["model"], dtype="bfloat16", enforce_eager=True, seed=0,
                  max_num_seqs=spec.get("max_num_seqs", 8), max_model_len=spec.get("max_model_len", 1024),
                  enable_prefix_caching=False)
    if spec.get("num_blocks"):
        kwargs["num_gpu_blocks_override"] = spec["num_blocks"]
    if spec.get("block_size"):
        kwargs["block_size"] = spec["block_size"]
    if spec.get("scheduler", "stock") == "ext":
        kwargs["scheduler_cls"] = "vllm_ext.sched.scheduler.PredictiveScheduler"
    if spec.get("worker", "stock") == "ext":
        kwargs["worker_cls"] = "vllm_ext.worker.probe_worker.ProbeWorker"
    if "ext" in spec:
        kwargs["additional_config"] = {"vllm_ext": spec["ext"]}
    kwargs.update(spec.get("llm_kwargs", {}))
    llm = LLM(**kwargs)
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler  # in-process (no V1 multiprocessing)
    if "phases" in spec:  # lifetime checks: several batches, state read around each
        return {"phases": [run_phase(engine, sched, phase) for phase in spec["phases"]]}
    free_before = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    pending = sorted(spec["requests"], key=lambda r: r.get("after_step", 0))
    result = {"finish_order": [], "token_ids": {}, "texts": {}, "finish_step": {},
              "scheduler_predictions": {}}
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0].get("after_step", 0) <= step:
            r = pending.pop(0)
            params = SamplingParams(max_tokens=r["max_tokens"], temperature=0.0,
                                    ignore_eos=r.get("ignore_eos", False),
                                    extra_args=r.get("xargs"))
            engine.add_request(r["id"], r["prompt"], params, priority=r.get("priority", 0))
        for out in engine.step():
            if out.finished:
                result["finish_order"].append(out.request_id)
                result["finish_step"][out.request_id] = step
                result["token_ids"][out.request_id] = list(out.outputs[0].token_ids)
                result["texts"][out.request_id] = out.outputs[0].text
        if spec.get("inspect_scheduler"):
            for req_id, values in sched.ext_predictions.items():
                result["scheduler_predictions"].setdefault(req_id, []).append(values)
        step += 1
    result["predictions"] = {
        tag: engine.collective_rpc("ext_get_predictions", args=(tag,))[0]
        for tag in spec.get("rpc_tags", [])
    }
    result["rpc"] = {method: engine.collective_rpc(method, kwargs=kw)[0]
                     for method, kw in spec.get("rpc", [])}
    # KV blocks back to where they were; the ext scheduler's counters and per-request state
    result["free_blocks"] = [free_before, sched.kv_cache_manager.block_pool.get_num_free_blocks()]
    if hasattr(sched, "ext_get_stats"):
        result["ext_stats"] = sched.ext_get_stats()
        policy = sched.ext_policy
        result["ext_state_sizes"] = {
            "predictions": len(sched.ext_predictions), "waiting_keys": len(sched.ext_waiting_keys),
            **{name: len(getattr(policy, name)) for name in ("prompt_pred", "trackers")
               if hasattr(policy, name)}}
    # the engine's KV capacity (as in its "KV cache size: N tokens" log line)
    result["kv_cache_size_tokens"] = getattr(engine.vllm_config.cache_config,
                                             "kv_cache_size_tokens", None)
    return result


def run_phase(engine, sched, phase: dict) -> dict:
    """One batch under the live settings `phase["live"]`, with aborts at given steps; the
    engine's per-request state (`ext_get_state`) before and after, and the workers'."""
    from vllm import SamplingParams

    if phase.get("live"):
        sched.ext_apply_config(phase["live"])
        engine.collective_rpc("ext_apply_config", args=(sched.ext_config.live_dict(),))
    before = sched.ext_get_state()
    pending = sorted(phase["requests"], key=lambda r: r.get("after_step", 0))
    aborts = dict(phase.get("abort_at", {}))
    finished, step = {}, 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0].get("after_step", 0) <= step:
            r = pending.pop(0)
            engine.add_request(r["id"], r["prompt"], SamplingParams(
                max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=r.get("ignore_eos", False),
                extra_args=r.get("xargs")))
        for req_id in [r for r, at in aborts.items() if at <= step]:
            engine.abort_request([req_id])
            del aborts[req_id]
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].finish_reason
        step += 1
    return {"before": before, "after": sched.ext_get_state(), "finished": finished,
            "workers": engine.collective_rpc("ext_get_state"), "stats": sched.ext_get_stats()}


if __name__ == "__main__":
    print("ENGINE_JOB_RESULT " + json.dumps(run(json.loads(sys.argv[1]))), flush=True)
