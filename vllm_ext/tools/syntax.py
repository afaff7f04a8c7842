"""How a model writes a tool call and reads its result (the server-side tool loop, LAMPS).

The loop (`vllm_ext.tools.loop`) pauses a request at the token that closes a call, parses the
call out of the text since the last opening marker, runs the tool and feeds the result back in
the model's own format. A `CallSyntax` holds those three things:

* ``testbed`` - the embedded reasoner's ``<call>lookup kamira</call>`` followed by
  ``<result>4821</result>`` (`vllm_ext.testbed.tasks`).
* ``hermes`` - OpenAI-style function calls as Qwen2.5 / Qwen3 / Hermes models write them when a
  chat request lists ``tools``: ``<tool_call>{"name": "lookup", "arguments": {"name":
  "kamira"}}</tool_call>``; the result goes back as the chat template renders a ``tool``
  message (``<|im_end|>`` the assistant turn, a ``user`` turn with ``<tool_response>``, a new
  ``assistant`` turn), so the model continues as if the client had sent the tool message.
  A registry tool takes one string: a call whose arguments hold one value gets that value
  (``{"name": "kamira"}`` -> ``"kamira"``), any other arguments their JSON text.

``resolve`` picks the syntax by name, or with ``auto`` the first whose closing marker is one
token of the model's tokenizer (testbed, then hermes).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from vllm_ext.testbed.tasks import CALL_CLOSE, CALL_OPEN, RESULT_CLOSE, RESULT_OPEN, parse_call


class CallSyntaxError(ValueError):
    """A call the model wrote that cannot be parsed; its message becomes the tool result."""


@dataclass(frozen=True)
class CallSyntax:
    name: str
    open: str                                  # marker before a call
    close: str                                 # marker ending it: one token, the pause point
    parse_body: Callable[[str], tuple[str, str]]  # text between the markers -> (tool, arg)
    feed: str                                  # what the model reads after `close`; {result}
    shown: str                                 # what the client sees of it; {result}

    def parse(self, text: str) -> tuple[str, str]:
        """(tool, arg) of the last call in `text` (the turn's text, ending at `close`)."""
        start = text.rfind(self.open)
        if start < 0:
            raise CallSyntaxError(f"no {self.open} before {self.close}")
        body = text[start + len(self.open):]
        if body.endswith(self.close):
            body = body[: -len(self.close)]
        return self.parse_body(body)

    def result(self, result: str) -> tuple[str, str]:
        """(text fed to the model, text shown to the client) for a tool's result."""
        return self.feed.format(result=result), self.shown.format(result=result)


def _parse_testbed(body: str) -> tuple[str, str]:
    name, arg = parse_call(body)
    if not name:
        raise CallSyntaxError("empty call")
    return name, arg


def _parse_hermes(body: str) -> tuple[str, str]:
    try:
        call = json.loads(body)
    except json.JSONDecodeError as exc:
        raise CallSyntaxError(f"tool call is not JSON ({exc.msg})") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise CallSyntaxError('tool call needs {"name": ..., "arguments": {...}}')
    args = call.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return call["name"], args
    if isinstance(args, dict) and len(args) == 1:
        (value,) = args.values()
        return call["name"], value if isinstance(value, str) else json.dumps(value)
    return call["name"], json.dumps(args)


TESTBED = CallSyntax("testbed", CALL_OPEN, CALL_CLOSE, _parse_testbed,
                     feed=f"{RESULT_OPEN}{{result}}{RESULT_CLOSE}",
                     shown=f"{RESULT_OPEN}{{result}}{RESULT_CLOSE}")
HERMES = CallSyntax("hermes", "<tool_call>", "</tool_call>", _parse_hermes,
                    feed="<|im_end|>\n<|im_start|>user\n<tool_response>\n{result}\n"
                         "</tool_response><|im_end|>\n<|im_start|>assistant\n",
                    shown="\n<tool_response>\n{result}\n</tool_response>\n")
SYNTAXES = {s.name: s for s in (TESTBED, HERMES)}  # ExtConfig's TOOL_SYNTAXES: these + auto


def close_token(tokenizer, syntax: CallSyntax) -> int | None:
    """The id of `syntax.close` if the tokenizer has it as one token, else None."""
    if tokenizer is None:
        return None
    ids = tokenizer.encode(syntax.close, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def resolve(name: str, tokenizer) -> tuple[CallSyntax, int | None]:
    """The syntax `name` (or with "auto" the first the tokenizer can pause on) and its close
    token id (None: this tokenizer cannot pause on it; tool requests then get a 400)."""
    if name != "auto":
        if name not in SYNTAXES:
            raise ValueError(f"unknown tool syntax {name!r}; known: auto, {', '.join(SYNTAXES)}")
        return SYNTAXES[name], close_token(tokenizer, SYNTAXES[name])
    for syntax in SYNTAXES.values():
        token = close_token(tokenizer, syntax)
        if token is not None:
            return syntax, token
    return TESTBED, None
