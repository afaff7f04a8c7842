"""The branch runner: a multi-branch request's branches as engine requests, in the API server.

DUCHESS (arXiv 2509.24957) and its baselines decide per request how many sampled branches run
and when they stop (`vllm_ext.branches.rules`); this module carries that out on vLLM. An n > 1
request whose mode is not "off" (``vllm_xargs: {"ext_branches": MODE}`` or the server's
``--ext-branches``) does not fan out inside vLLM: `install` wraps the engine client's
``generate`` on the API server, and the wrapper starts each branch as its own n = 1 engine
request (seed + i when the request has a seed), tagged ``<tag>.b<i>`` so the workers' probe
values for all branches come back in one ``collective_rpc("ext_get_predictions")`` per round
(`vllm_ext.worker.channel`). Every ``--ext-branch-every`` generated tokens of a branch is a
round: the runner reads the branch's latest ``p_correct`` and applies the plan. A terminated
or surplus branch is aborted (its generator closed: vLLM aborts the engine request and frees
its KV); a fork is a new request whose prompt is the parent's prompt plus the parent's tokens so
far, so vLLM's prefix cache shares the parent's full KV blocks. The caller gets one completion:
the chosen answer's best-scoring branch (text and tokens from the prompt on), as a single
output at the end. `take_stats(tag)` gives the middleware the votes and counts for the
response's ``vllm_ext.branches``. Closing the caller's generator (a client disconnect) aborts
every branch before it returns.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import re
import uuid
from collections import OrderedDict

from vllm.logger import init_logger

from vllm_ext.branches.confidence import META_KEY, Combiner, Confidence
from vllm_ext.branches.metrics import TOTALS
from vllm_ext.branches.rules import CANCELLED, RUNNING, Branch, Step, extract_answer, make_plan
from vllm_ext.worker.channel import TAG_KEY

logger = init_logger(__name__)

BRANCHES_KEY = "ext_branches"   # vllm_xargs: off | sc | esc | duchess
# per-request overrides of the server's branch settings: vllm_xargs key -> ExtConfig field
OVERRIDE_KEYS = {f"ext_{name}": name for name in (
    "branch_tau", "branch_patience", "branch_dup_tau", "branch_max", "branch_max_tokens",
    "branch_agree", "branch_start", "branch_esc_window")}
STATS_KEEP = 4096               # finished requests' stats kept for the middleware


def request_config(ext, xargs: dict | None):
    """`ext` with the request's ``ext_branch_*`` overrides (ExtConfigError if one is bad)."""
    changes = {field: xargs[key] for key, field in OVERRIDE_KEYS.items() if key in (xargs or {})}
    if not changes:
        return ext
    from vllm_ext.config import ExtConfig, ExtConfigError

    try:
        return ExtConfig.from_dict({**ext.to_dict(), **changes})
    except ExtConfigError as exc:
        raise ExtConfigError(f"vllm_xargs overrides: {exc}") from None


def branch_mode(sampling_params, ext) -> str:
    """The mode a request runs in: its ``ext_branches``, else the server's for n > 1."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    mode = extra.get(BRANCHES_KEY)
    if mode is None:
        mode = ext.branches if (sampling_params.n or 1) > 1 else "off"
    return mode


@dataclasses.dataclass
class _Live:
    """A running branch's engine side: its task and what it generated."""
    branch: Branch
    prefix_text: str = ""
    prefix_ids: list[int] = dataclasses.field(default_factory=list)
    text: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    last: object = None   # its latest RequestOutput
    task: asyncio.Task | None = None
    conf: Confidence = dataclasses.field(default_factory=Confidence)  # its sampled tokens'
    p_probe: float | None = None  # the probe's latest P(correct)
    p_prefill: float | None = None  # ... and its first, at the end of the prompt's prefill


class BranchRunner:
    def __init__(self, engine_client, ext) -> None:
        self.client = engine_client
        self.plain_generate = engine_client.generate
        self.ext = ext
        self.answer_re = re.compile(ext.branch_answer_regex)
        self.stats: OrderedDict[str, dict] = OrderedDict()
        self.probe_missing_logged = False
        self.combiner: Combiner | None = None
        self.combiner_read = False

    def generate(self, prompt, sampling_params, request_id, **kwargs):
        mode = branch_mode(sampling_params, self.ext)
        if mode == "off":
            return self.plain_generate(prompt, sampling_params, request_id, **kwargs)
        return self._run(mode, prompt, sampling_params, request_id, **kwargs)

    def take_stats(self, tag: str) -> dict | None:
        return self.stats.pop(tag, None)

    # ---- one request ---------------------------------------------------------------------
    async def _run(self, mode, prompt, params, request_id, **kwargs):
        from vllm.sampling_params import RequestOutputKind

        if not (isinstance(prompt, dict) and "prompt_token_ids" in prompt):
            raise ValueError(f"{BRANCHES_KEY}: needs a token prompt, got {type(prompt).__name__}")
        kwargs.pop("session_id", None)  # branches are independent requests
        ext = request_config(self.ext, params.extra_args)
        plan = make_plan(mode, params.n or 1, ext)
        tag = (params.extra_args or {}).get(TAG_KEY) or uuid.uuid4().hex
        cap = ext.branch_max_tokens or params.max_tokens or 1 << 30
        cap = min(cap, params.max_tokens or cap)
        every = ext.branch_every
        events: asyncio.Queue = asyncio.Queue()
        live: dict[int, _Live] = {}
        first_out = None

        def launch(branch: Branch) -> None:
            state = _Live(branch)
            if branch.parent is not None:
                parent = live[branch.parent]
                state.prefix_text = parent.prefix_text + "".join(parent.text)
                state.prefix_ids = parent.prefix_ids + parent.token_ids
                state.conf = parent.conf.copy()
                state.p_probe, state.p_prefill = parent.p_probe, parent.p_prefill
            turn = params.clone()
            turn.n, turn.output_kind = 1, RequestOutputKind.DELTA
            if plan.name == "duchess":  # the sampled token's logprob: token confidence
                turn.logprobs = 0
            turn.max_tokens = max(1, cap - branch.inherited)
            if params.seed is not None:
                turn.seed = params.seed + branch.index
            turn.extra_args = {**(params.extra_args or {}), TAG_KEY: f"{tag}.b{branch.index}"}
            for key in (BRANCHES_KEY, *OVERRIDE_KEYS):
                turn.extra_args.pop(key, None)
            branch_prompt = dict(prompt)
            branch_prompt["prompt_token_ids"] = list(prompt["prompt_token_ids"]) + state.prefix_ids
            branch_prompt.pop("prompt", None)
            gen = self.plain_generate(branch_prompt, turn, f"{request_id}-b{branch.index}",
                                      **kwargs)
            state.task = asyncio.create_task(_pump(branch.index, gen, events))
            live[branch.index] = state

        def apply(step: Step) -> bool:
            for index in step.terminate:
                live[index].task.cancel()
            for branch in step.start:
                launch(branch)
            return step.done

        if plan.name == "duchess":
            await self._read_combiner()
        done = apply(plan.begin())
        try:
            while not done and any(s.task and not s.task.done() for s in live.values()) \
                    or not events.empty():
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                due = []
                for index, out, error in batch:
                    state = live[index]
                    if error is not None:
                        raise error
                    if out is None or state.branch.state != RUNNING:
                        continue
                    first_out = first_out or out
                    step = self._take(plan, state, out, every, due)
                    done = (step is not None and apply(step)) or done
                if due and not done and plan.name == "duchess":  # only duchess reads scores
                    done = await self._rounds(plan, tag, due, live, apply) or done
                if done:
                    break
        finally:
            await _stop_all(plan, live)
        answer, chosen = plan.choose()
        self._record(tag, mode, plan, answer)
        if chosen is None:
            raise RuntimeError(f"{BRANCHES_KEY}: no branch of request {request_id} finished")
        state = live[chosen.index]
        yield _final_output(state, first_out)

    def _take(self, plan, state: _Live, out, every: int, due: list) -> Step | None:
        """Add a branch's output; the plan's step when it finished, else None (and the
        branch in `due` when it crossed a round boundary)."""
        piece = out.outputs[0]
        branch = state.branch
        before = branch.tokens
        state.text.append(piece.text)
        state.token_ids.extend(piece.token_ids)
        state.conf.add(entry[tok].logprob for tok, entry
                       in zip(piece.token_ids, piece.logprobs or ()) if tok in entry)
        state.last = out
        branch.tokens += len(piece.token_ids)
        if out.finished:
            if self.combiner is not None and plan.name == "duchess" and state.conf.count:
                # the vote weight: the score over the whole branch
                final = self.combiner.score(state.p_probe, state.p_prefill, state.conf)
                if final is not None:
                    branch.scores.append(final)
            answer = extract_answer(state.prefix_text + "".join(state.text), self.answer_re)
            return plan.finish(branch.index, answer)
        total = branch.inherited + branch.tokens
        if total // every > (branch.inherited + before) // every:
            due.append(branch.index)
        return None

    async def _read_combiner(self) -> None:
        """Once: the correctness probe's confidence combiner from the workers (None without
        one: the probe's value is the score)."""
        if self.combiner_read:
            return
        self.combiner_read = True
        try:
            metas = await self.client.collective_rpc("ext_probe_meta", args=("correctness",))
            meta = next((m for m in metas or [] if m), None) or {}
            self.combiner = Combiner.from_meta(meta.get(META_KEY))
        except Exception:
            logger.exception("vllm-ext: reading the correctness probe's confidence combiner "
                             "failed; branch scores are the probe's values")
            self.combiner = None
        if self.combiner is not None:
            logger.info("vllm-ext: duchess branch scores: probe + token confidence %s",
                        self.combiner.weights)

    async def _rounds(self, plan, tag: str, due: list[int], live: dict, apply) -> bool:
        scores = await self._scores(tag)
        done = False
        for index in due:
            if plan.branches[index].state != RUNNING:
                continue
            state = live[index]
            latest, first = scores.get(f"{tag}.b{index}", (None, None))
            state.p_probe = latest if latest is not None else state.p_probe
            if state.p_prefill is None:  # a fork keeps its parent's
                state.p_prefill = first
            score = state.p_probe
            if score is not None and self.combiner is not None:
                score = self.combiner.score(score, state.p_prefill, state.conf)
            if score is None and plan.name == "duchess" and not self.probe_missing_logged:
                self.probe_missing_logged = True
                logger.warning("vllm-ext: no p_correct for branch %s (correctness probe not "
                               "loaded or failing); duchess continues such branches", index)
            done = apply(plan.round(index, score)) or done
        return done

    async def _scores(self, tag: str) -> dict[str, tuple[float, float | None]]:
        """Per branch tag: the probe's latest p_correct and its first (end of prefill)."""
        try:
            results = await self.client.collective_rpc(
                "ext_get_predictions", args=(None, None, f"{tag}.b"))
        except Exception:
            if not self.probe_missing_logged:
                self.probe_missing_logged = True
                logger.exception("vllm-ext: reading branch predictions failed; branches "
                                 "continue without probe scores")
            return {}
        scores = {}
        for worker in results or []:
            for entry in (worker or {}).values():
                value = (entry.get("values") or {}).get("p_correct")
                first = (entry.get("first") or {}).get("p_correct")
                if value is not None and entry.get("tag"):
                    scores.setdefault(entry["tag"], (float(value), first))
        return scores

    def _record(self, tag: str, mode: str, plan, answer) -> None:
        counts = {state: sum(b.state == state for b in plan.branches)
                  for state in ("finished", "terminated", "cancelled")}
        stats = {"mode": mode, "answer": answer, "votes": plan.votes(),
                 "weighted_votes": {a: round(v, 4) for a, v in plan.votes(True).items()},
                 "branches_run": len(plan.branches),
                 "duplicated": sum(b.parent is not None for b in plan.branches),
                 **counts, "tokens": sum(b.tokens for b in plan.branches)}
        self.stats[tag] = stats
        while len(self.stats) > STATS_KEEP:
            self.stats.popitem(last=False)
        TOTALS.add(stats)


async def _pump(index: int, gen, events: asyncio.Queue) -> None:
    """Feed one branch's outputs to the request's queue; (index, None, None) at its end."""
    try:
        async for out in gen:
            await events.put((index, out, None))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        await events.put((index, None, exc))
    finally:
        await gen.aclose()
    await events.put((index, None, None))


async def _stop_all(plan, live: dict[int, _Live]) -> None:
    """Abort every branch still running (closing its generator aborts the engine request)."""
    tasks = [s.task for s in live.values() if s.task and not s.task.done()]
    for state in live.values():
        if state.branch.state == RUNNING and state.task in tasks:
            state.branch.state = CANCELLED
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


def _final_output(state: _Live, first_out):
    """One RequestOutput: the branch's completion from the prompt on, finished."""
    out = state.last
    piece = out.outputs[0]
    result = copy.copy(out)
    result.outputs = [dataclasses.replace(
        piece, index=0, text=state.prefix_text + "".join(state.text),
        token_ids=state.prefix_ids + state.token_ids,
        logprobs=None, cumulative_logprob=None)]  # branches ran with logprobs for confidence
    result.finished = True
    if first_out is not None:
        result.prompt, result.prompt_token_ids = first_out.prompt, first_out.prompt_token_ids
    return result


def install(engine_client, ext) -> BranchRunner:
    """Wrap `engine_client.generate` (once) with the branch runner configured by `ext`."""
    from vllm_ext.generate_wrap import wrap_generate

    return wrap_generate(engine_client, "ext_branch_runner",
                         lambda: BranchRunner(engine_client, ext))
