"""Run testbed tasks through a vLLM `LLM`, tool loop included, and score them.

Generation stops at ``</call>``; the harness runs the tool (`tasks.run_tool`), appends
``<result>...</result>`` and continues, up to `max_calls` calls per task. All tasks advance
together, one vLLM `generate` call per round, so batching stays efficient.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm_ext.testbed.tasks import (RESULT_CLOSE, RESULT_OPEN, Task, check_answer,
                                    pending_call, prompt_text, run_tool)


@dataclass
class Attempt:
    task: Task
    completion: str = ""
    output_tokens: int = 0          # tokens the model generated (tool results excluded)
    tool_calls: int = 0
    finished: bool = False
    correct: bool = False
    samples: list[str] = field(default_factory=list)


def solve(llm, tasks: list[Task], temperature: float = 0.0, max_tokens: int = 400,
          max_calls: int = 4, seed: int = 0) -> list[Attempt]:
    from vllm import SamplingParams

    attempts = [Attempt(t) for t in tasks]
    for _round in range(max_calls + 1):
        todo = [a for a in attempts if not a.finished]
        if not todo:
            break
        params = [SamplingParams(temperature=temperature, seed=seed + i, stop=["</call>"],
                                 include_stop_str_in_output=True,
                                 max_tokens=max(1, max_tokens - a.output_tokens))
                  for i, a in enumerate(todo)]
        outs = llm.generate([prompt_text(a.task) + a.completion for a in todo], params,
                            use_tqdm=False)
        for a, out in zip(todo, outs):
            piece = out.outputs[0]
            a.completion += piece.text
            a.output_tokens += len(piece.token_ids)
            call = pending_call(a.completion)
            if call and a.tool_calls < max_calls and a.output_tokens < max_tokens:
                a.tool_calls += 1
                a.completion += f"{RESULT_OPEN}{run_tool(call)}{RESULT_CLOSE}"
            else:
                a.finished = True
    for a in attempts:
        a.finished = True
        a.correct = check_answer(a.task, a.completion)
    return attempts
