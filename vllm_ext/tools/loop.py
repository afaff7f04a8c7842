"""The server-side tool loop (LAMPS, arXiv 2410.18248: requests that pause for API calls).

A request sent with ``vllm_xargs: {"ext_tools": true}`` runs its tool calls inside the server:
it generates until it emits the marker that closes a call (``</call>`` for the embedded model,
``</tool_call>`` for Qwen/Hermes-style function calls: `vllm_ext.tools.syntax`, a stop token of
the turn), pauses in the engine, the tool runs off the event loop (thread pool,
``--ext-tool-timeout``), and the same engine request resumes with the marker and the result in
the model's format appended (``</call><result>...</result>``). The client sees one
completion (streamed or not) whose text holds the calls and results, as the testbed's
client-side harness would have built it; the calls are listed in the response's ``vllm_ext``
object (`vllm_ext.server.middleware`). A tool that raises or times out becomes an
``error: ...`` result; the request never hangs on it.

The pause is vLLM 0.32's own streaming-input session (``AsyncLLM.generate`` given an async
generator of `StreamingInput`): between turns the engine keeps the request (and, by default,
its KV blocks) in ``WAITING_FOR_STREAMING_REQ``. Before the tool runs, the loop tells the
scheduler which tool was called and how long it is predicted to take (`DurationHistory`), so
the scheduler's handling rule can keep, drop or move the request's KV for the call
(`vllm_ext.sched.pauses`). `install` wraps the engine client's ``generate`` on the API
server; requests without ``ext_tools`` pass through untouched.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from vllm.logger import init_logger

from vllm_ext.engine_rpc import scheduler_call
from vllm_ext.tools.history import DurationHistory
from vllm_ext.tools.registry import Registry
from vllm_ext.tools.syntax import CallSyntaxError, resolve
from vllm_ext.worker.channel import TAG_KEY

logger = init_logger(__name__)

TOOLS_KEY = "ext_tools"            # vllm_xargs: true -> tool calls run in the server
SESSION_KEY = "ext_tool_session"   # set by the loop on every turn: names the request's pauses
CALLS_KEEP = 4096                  # finished requests' call lists kept for the middleware


@dataclass
class CallRecord:
    tool: str
    arg: str
    result: str
    seconds: float
    predicted_s: float
    error: bool = False


# what the loop cannot serve: request field -> "is this value unsupported?". One list for
# the middleware (HTTP 400 on the request body) and `ToolLoop.check` (the sampling params)
UNSUPPORTED = {
    "stop": lambda v: bool(v),
    "n": lambda v: v not in (None, 1),
    "logprobs": lambda v: v not in (None, False, 0),
    "use_beam_search": lambda v: bool(v),
}


def unsupported(fields: dict) -> str | None:
    """Why a request with these field values cannot run its tools in the server, or None."""
    for key, bad in UNSUPPORTED.items():
        if bad(fields.get(key)):
            return f"{TOOLS_KEY}: not supported with {key}={fields[key]!r}"
    return None


class ToolLoop:
    def __init__(self, engine_client, registry: Registry, timeout_s: float, max_calls: int,
                 syntax: str = "auto"):
        self.client = engine_client
        self.plain_generate = engine_client.generate
        self.registry = registry
        self.timeout_s = timeout_s
        self.max_calls = max_calls
        self.history = DurationHistory()
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="vllm-ext-tool")
        self.calls: dict[str, list[CallRecord]] = {}  # by the middleware's request tag
        self.notice_failed = False
        self.tokenizer = engine_client.renderer.tokenizer
        self.syntax, self.close_id = resolve(syntax, self.tokenizer)

    # ---- the wrapped generate ----------------------------------------------------------------
    def generate(self, prompt, sampling_params, request_id, **kwargs):
        extra = getattr(sampling_params, "extra_args", None) or {}
        if not extra.get(TOOLS_KEY):
            return self.plain_generate(prompt, sampling_params, request_id, **kwargs)
        return self._generate_with_tools(prompt, sampling_params, request_id, **kwargs)

    def check(self, sampling_params) -> None:
        """Why this request cannot run its tools in the server (ValueError), or nothing."""
        if self.close_id is None:
            raise ValueError(self.no_pause_token())
        reason = unsupported({key: getattr(sampling_params, key, None) for key in UNSUPPORTED})
        if reason:
            raise ValueError(reason)

    async def _generate_with_tools(self, prompt, sampling_params, request_id, **kwargs):
        from vllm.engine.protocol import StreamingInput
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self.check(sampling_params)
        caller_kind = sampling_params.output_kind
        session = uuid.uuid4().hex
        budget = sampling_params.max_tokens
        turn = _turn_params(sampling_params, self.close_id, session, budget)
        chunks: asyncio.Queue = asyncio.Queue()

        async def inputs():
            yield StreamingInput(prompt=prompt, sampling_params=turn)
            while (chunk := await chunks.get()) is not None:
                yield chunk

        tag = sampling_params.extra_args.get(TAG_KEY, session)
        records = self.calls.setdefault(tag, [])
        text, token_ids, first = [], [], None
        inner = self.plain_generate(inputs(), turn, request_id, **kwargs)
        try:
            async for out in inner:
                first = first or out
                piece = out.outputs[0]
                text.append(piece.text)
                token_ids.extend(piece.token_ids)
                ended = piece.finish_reason is not None
                # the last token, not stop_reason: vLLM 0.32 keeps a session's stop_reason
                # from the turn before, so an EOS after a call still reads as the call token
                is_call = ended and list(piece.token_ids[-1:]) == [self.close_id]
                if is_call and len(records) < self.max_calls and len(token_ids) < budget:
                    record = await self._run_call("".join(text), session)
                    records.append(record)
                    feed, shown = self.syntax.result(record.result)
                    if caller_kind == RequestOutputKind.DELTA:
                        yield _output(out, piece.text, piece.token_ids, finished=False)
                        yield _output(out, shown, [], finished=False)
                    text.append(shown)
                    result_ids = self.tokenizer.encode(feed, add_special_tokens=False)
                    await chunks.put(StreamingInput(
                        prompt=TokensPrompt(prompt_token_ids=[self.close_id] + result_ids),
                        sampling_params=_turn_params(sampling_params, self.close_id, session,
                                                     budget - len(token_ids))))
                    continue
                if ended:
                    await chunks.put(None)  # ends the session: the engine frees the request
                if caller_kind == RequestOutputKind.DELTA:
                    yield _output(out, piece.text, piece.token_ids, finished=ended,
                                  final_piece=piece if ended else None)
                elif ended:
                    yield _output(out, "".join(text), token_ids, finished=True,
                                  final_piece=piece, prompt_from=first)
                if ended:
                    break
        finally:
            await inner.aclose()
            self._trim_calls()

    def no_pause_token(self) -> str:
        return (f"ext_tools: this model's tokenizer has no single {self.syntax.close} token to "
                f"pause on (tool syntax {self.syntax.name}; --ext-tool-syntax)")

    async def _run_call(self, text_so_far: str, session: str) -> CallRecord:
        try:
            name, arg = self.syntax.parse(text_so_far)
        except CallSyntaxError as exc:  # nothing runs: the model reads why
            return CallRecord("", text_so_far[-200:], f"error: {exc}", 0.0, 0.0, error=True)
        predicted = self.history.predict(name)
        try:  # the scheduler chooses the KV handling for the call before it starts
            await scheduler_call(self.client, "ext_tool_pause", session, name, predicted)
        except Exception:  # e.g. a stock scheduler: vLLM keeps the KV (preserve)
            if not self.notice_failed:
                logger.exception("vllm-ext: tool pause notices fail (first: %s); paused "
                                 "requests keep their KV", name)
            self.notice_failed = True
        start = time.perf_counter()
        result, error = await self._call_tool(name, arg)
        seconds = time.perf_counter() - start
        self.history.observe(name, seconds)
        return CallRecord(name, arg, result, seconds, predicted, error)

    async def _call_tool(self, name: str, arg: str) -> tuple[str, bool]:
        fn = self.registry.tools.get(name)
        if fn is None:
            return f"error: unknown tool {name}", True
        latency = self.registry.latency(name)
        loop = asyncio.get_running_loop()

        def run() -> str:
            if latency > 0:
                time.sleep(latency)
            return str(fn(arg))

        try:
            return await asyncio.wait_for(loop.run_in_executor(self.pool, run),
                                          self.timeout_s), False
        except asyncio.TimeoutError:
            return f"error: tool {name} timed out after {self.timeout_s:g}s", True
        except Exception as exc:  # the model sees the error as the result
            return f"error: tool {name} failed: {type(exc).__name__}: {exc}", True

    def take_calls(self, tag: str) -> list[dict]:
        return [dataclasses.asdict(r) for r in self.calls.pop(tag, [])]

    def _trim_calls(self) -> None:
        while len(self.calls) > CALLS_KEEP:
            self.calls.pop(next(iter(self.calls)))


def _turn_params(params, close_id: int, session: str, max_tokens: int):
    from vllm.sampling_params import RequestOutputKind

    turn = params.clone()
    turn.output_kind = RequestOutputKind.DELTA
    turn.stop_token_ids = list(params.stop_token_ids or []) + [close_id]
    turn.include_stop_str_in_output = True
    turn.max_tokens = max(1, max_tokens)
    turn.extra_args = {**(params.extra_args or {}), SESSION_KEY: session}
    return turn


def _output(out, text: str, token_ids, finished: bool, final_piece=None, prompt_from=None):
    """A copy of RequestOutput `out` with one completion of `text` / `token_ids`; the finish
    reason only on the last output of the request (turn ends in between are not finishes)."""
    piece = out.outputs[0]
    result = copy.copy(out)
    stop = final_piece.stop_reason if final_piece else None
    if stop is not None and list(final_piece.token_ids[-1:]) != [stop]:
        stop = None  # a stale stop_reason from an earlier turn (see above)
    result.outputs = [dataclasses.replace(
        piece, text=text, token_ids=list(token_ids),
        finish_reason=final_piece.finish_reason if final_piece else None, stop_reason=stop)]
    result.finished = finished
    if prompt_from is not None:
        result.prompt, result.prompt_token_ids = prompt_from.prompt, prompt_from.prompt_token_ids
    return result


def install(engine_client, ext) -> ToolLoop:
    """Wrap `engine_client.generate` (once) with the tool loop configured by `ext`."""
    from vllm_ext.generate_wrap import wrap_generate

    return wrap_generate(engine_client, "ext_tool_loop", lambda: ToolLoop(
        engine_client, Registry.build(ext.tools, ext.tool_latency, ext.tool_http_base),
        ext.tool_timeout_s, ext.tool_max_calls, ext.tool_syntax))
