"""Tool-call syntaxes of the server-side tool loop (`vllm_ext.tools.syntax`), and the loop
driven through a hermes-style (Qwen2.5 / OpenAI tools) call by a scripted engine."""
import asyncio
import json
from types import SimpleNamespace

import pytest

from vllm_ext.tools.syntax import HERMES, SYNTAXES, TESTBED, CallSyntaxError, resolve


def _hermes_tokenizer():
    """The testbed tokenizer plus Qwen2.5's tool and chat markers as single tokens."""
    from vllm_ext.testbed.tokenizer import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [
        "<tool_call>", "</tool_call>", "<|im_start|>", "<|im_end|>"]})
    return tok


def test_config_choices_are_the_syntaxes():
    from vllm_ext.config import TOOL_SYNTAXES, ExtConfig, ExtConfigError

    assert set(TOOL_SYNTAXES) == {"auto", *SYNTAXES}
    with pytest.raises(ExtConfigError, match="--ext-tool-syntax: invalid value .xml."):
        ExtConfig(tool_syntax="xml")


def test_testbed_syntax_parses_the_last_call():
    text = "<call>calc 1+2</call><result>3</result>\n<call>lookup kamira</call>"
    assert TESTBED.parse(text) == ("lookup", "kamira")
    assert TESTBED.result("4821") == ("<result>4821</result>",) * 2
    with pytest.raises(CallSyntaxError):
        TESTBED.parse("no call here</call>")


@pytest.mark.parametrize("body, expected", [
    ('{"name": "lookup", "arguments": {"name": "kamira"}}', ("lookup", "kamira")),
    ('{"name": "calc", "arguments": {"x": 3}}', ("calc", "3")),
    ('{"name": "f", "arguments": {"a": 1, "b": "c"}}', ("f", '{"a": 1, "b": "c"}')),
    ('{"name": "f", "arguments": "{\\"q\\": \\"v\\"}"}', ("f", "v")),
    ('{"name": "f"}', ("f", "{}")),
])
def test_hermes_syntax_parses_openai_style_calls(body, expected):
    assert HERMES.parse(f"thinking <tool_call>\n{body}\n</tool_call>") == expected


@pytest.mark.parametrize("body", ["{not json", '["lookup"]', '{"arguments": {}}', '{"name": ""}'])
def test_hermes_syntax_rejects_malformed_calls(body):
    with pytest.raises(CallSyntaxError):
        HERMES.parse(f"<tool_call>{body}</tool_call>")


def test_resolve_picks_the_syntax_the_tokenizer_can_pause_on():
    from vllm_ext.testbed.tokenizer import build_tokenizer

    syntax, close_id = resolve("auto", build_tokenizer())
    assert syntax is TESTBED and close_id is not None
    tok = _hermes_tokenizer()
    assert resolve("hermes", tok)[1] == tok.convert_tokens_to_ids("</tool_call>")
    assert resolve("hermes", build_tokenizer()) == (HERMES, None)  # no single token: 400 later
    with pytest.raises(ValueError, match="unknown tool syntax"):
        resolve("xml", tok)


class _ScriptedEngine:
    """An AsyncLLM stand-in: each streaming input gets the next scripted turn (text ending at
    the call's closing token, or a final answer)."""

    def __init__(self, tokenizer, turns):
        self.renderer = SimpleNamespace(tokenizer=tokenizer)
        self.turns, self.inputs, self.pauses = list(turns), [], []
        self.engine_core = SimpleNamespace(call_utility_async=self._utility)

    async def _utility(self, method, name, args):  # the scheduler's ext_tool_pause
        self.pauses.append((name, args[1]))
        return {"handling": "preserve"}

    async def _run(self, inputs):
        from vllm.outputs import CompletionOutput

        tok = self.renderer.tokenizer
        async for chunk in inputs:
            self.inputs.append(chunk.prompt)
            text = self.turns.pop(0)
            ids = tok.encode(text, add_special_tokens=False)
            piece = CompletionOutput(0, text, ids, None, None, finish_reason="stop",
                                     stop_reason=None)
            yield SimpleNamespace(outputs=[piece], finished=True, prompt="p", prompt_token_ids=[1])

    def generate(self, prompt, params, request_id, **kwargs):
        return self._run(prompt)


def test_loop_runs_a_hermes_call_and_feeds_the_chat_templated_result():
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    from vllm_ext.tools.loop import ToolLoop
    from vllm_ext.tools.registry import Registry

    from vllm_ext.testbed.tasks import NAMES, lookup_value

    tok, name = _hermes_tokenizer(), NAMES[7]
    call = json.dumps({"name": "lookup", "arguments": {"name": name}})
    engine = _ScriptedEngine(tok, [f"Let me look. <tool_call>{call}</tool_call>",
                                   "The value is 4821."])
    loop = ToolLoop(engine, Registry.build(latency="lookup=0"), timeout_s=5, max_calls=4,
                    syntax="hermes")
    assert loop.syntax is HERMES
    params = SamplingParams(max_tokens=200, output_kind=RequestOutputKind.FINAL_ONLY,
                            extra_args={"ext_tools": True})

    async def run():
        return [out async for out in loop.generate("prompt", params, "r1")]

    (final,) = asyncio.run(run())
    value = str(lookup_value(name))
    text = final.outputs[0].text
    assert text.startswith("Let me look. <tool_call>") and text.endswith("The value is 4821.")
    assert f"<tool_response>\n{value}\n</tool_response>" in text
    fed = tok.decode(engine.inputs[1]["prompt_token_ids"])
    assert fed.startswith("</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>")
    assert fed.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    (record,) = loop.take_calls(next(iter(loop.calls)))
    assert (record["tool"], record["arg"], record["result"]) == ("lookup", name, value)
    assert engine.pauses == [("ext_tool_pause", "lookup")]  # the scheduler chose the handling


def test_loop_answers_a_malformed_call_with_an_error_result():
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    from vllm_ext.tools.loop import ToolLoop
    from vllm_ext.tools.registry import Registry

    tok = _hermes_tokenizer()
    engine = _ScriptedEngine(tok, ["<tool_call>{lookup kamira}</tool_call>", "sorry"])
    loop = ToolLoop(engine, Registry.build(), timeout_s=5, max_calls=4, syntax="hermes")
    params = SamplingParams(max_tokens=200, output_kind=RequestOutputKind.FINAL_ONLY,
                            extra_args={"ext_tools": True})

    async def run():
        return [out async for out in loop.generate("prompt", params, "r1")]

    (final,) = asyncio.run(run())
    assert "error: tool call is not JSON" in final.outputs[0].text
    assert final.outputs[0].text.endswith("sorry")
    (record,) = loop.take_calls(next(iter(loop.calls)))
    assert record["error"] and record["tool"] == ""
    assert engine.pauses == []  # nothing ran: the request was not paused for a call


def test_middleware_refuses_openai_tools_that_vllms_parser_would_return_again():
    from vllm_ext.server.middleware import BadExtArgs, check_tool_request
    from vllm_ext.tools.loop import ToolLoop
    from vllm_ext.tools.registry import Registry

    engine = _ScriptedEngine(_hermes_tokenizer(), [])
    loop = ToolLoop(engine, Registry.build(), timeout_s=1, max_calls=4, syntax="hermes")
    engine.ext_tool_loop, engine.vllm_config = loop, None
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    for auto in (False, True):
        app = SimpleNamespace(state=SimpleNamespace(
            engine_client=engine, openai_serving_chat=SimpleNamespace(enable_auto_tools=auto)))
        check_tool_request(app, {"tools": tools, "tool_choice": "none"})
        check_tool_request(app, {"messages": []})
        if auto:
            with pytest.raises(BadExtArgs, match="tool_choice 'none'"):
                check_tool_request(app, {"tools": tools})
        else:
            check_tool_request(app, {"tools": tools})
