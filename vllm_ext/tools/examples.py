"""Example tools for ``--ext-tools vllm_ext.tools.examples:TOOLS`` (also used by the tests).

``echo`` returns its argument, ``fail`` raises (the model sees an ``error: ...`` result) and
``sleep`` sleeps for its argument in seconds (to exercise ``--ext-tool-timeout``)."""
from __future__ import annotations

import time


def echo(arg: str) -> str:
    return arg


def fail(arg: str) -> str:
    raise RuntimeError(f"tool failure requested ({arg})")


def sleep(arg: str) -> str:
    time.sleep(float(arg))
    return "slept"


TOOLS = {"echo": echo, "fail": fail, "sleep": sleep}
