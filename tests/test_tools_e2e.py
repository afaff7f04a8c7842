"""LAMPS e2e: tool calls run inside `vllm-ext serve` (one server for the module).

Each tool task's calls are paused in the engine (vLLM's streaming-input session) and resumed
with the tool's result; checked: answers, the listed calls, stream == non-stream, identical
greedy text whether the paused KV is kept or discarded (switched live), the pause counters on
/metrics, 400s for what the loop can't serve, and a client that disconnects while its request
waits on a tool: the request is gone and every KV block is back.
"""
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import admin_state, set_live, set_tool_handling, wait_drained

from vllm_ext.testbed.tasks import check_answer, generate_tasks, prompt_text

pytestmark = pytest.mark.e2e
TOKEN = "tools-admin-token"


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    from vllm_ext.bench.servers import running_server

    flags = ("--enforce-eager --max-model-len 512 --max-num-seqs 4 "
             "--ext-tools vllm_ext.tools.examples:TOOLS --ext-tool-latency calc=0,lookup=0.3 "
             f"--ext-tool-timeout 5 --ext-admin-token {TOKEN}")
    with running_server("ext", model_path, flags,
                        tmp_path_factory.mktemp("log") / "server.log", timeout_s=300) as running:
        yield running.url


def complete(server, prompt, stream=False, **extra):
    body = {"model": "bench", "prompt": prompt, "max_tokens": 160, "temperature": 0,
            "vllm_xargs": {"ext_tools": True}, **extra}
    if not stream:
        return httpx.post(server + "/v1/completions", json=body, timeout=120)
    text, ext, finishes = "", None, []
    with httpx.stream("POST", server + "/v1/completions", json={**body, "stream": True},
                      timeout=120) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                for choice in event.get("choices") or []:
                    text += choice["text"]
                    finishes.append(choice["finish_reason"])
                ext = event.get("vllm_ext", ext)
    return text, ext, [f for f in finishes if f]


def state(server):
    return admin_state(server, TOKEN)


def set_handling(server, handling):
    set_tool_handling(server, TOKEN, handling)


TASKS = generate_tasks(4, seed=3, kinds=["calc", "lookup"])


def test_tool_tasks_answer_with_calls_listed(server):
    correct = 0
    for task in TASKS:
        resp = complete(server, prompt_text(task))
        assert resp.status_code == 200, resp.text
        data = resp.json()
        text = data["choices"][0]["text"]
        calls = data["vllm_ext"]["tool_calls"]
        # every call in the text is listed, in order, with the result the text carries
        in_text = re.findall(r"<call>(\w+) ([^<]*)</call><result>([^<]*)</result>", text)
        assert [(c["tool"], c["arg"], c["result"]) for c in calls] == in_text
        assert len(calls) == len(task.tool_calls)
        assert data["choices"][0]["finish_reason"] == "stop"
        correct += check_answer(task, text)
    assert correct >= 3


def test_same_text_streamed_and_whether_kv_kept_or_discarded(server):
    before = httpx.get(server + "/metrics").text
    texts = {}
    for handling in ("preserve", "discard"):
        set_handling(server, handling)
        texts[handling] = [complete(server, prompt_text(t)).json()["choices"][0]["text"]
                           for t in TASKS[:3]]
    set_handling(server, "preserve")
    assert texts["discard"] == texts["preserve"]
    streamed, ext, finishes = complete(server, prompt_text(TASKS[0]), stream=True)
    assert streamed == texts["preserve"][0] and finishes == ["stop"]
    assert len(ext["tool_calls"]) == len(TASKS[0].tool_calls)
    after = httpx.get(server + "/metrics").text
    for handling in ("preserve", "discard"):
        assert _counter(after, handling) > _counter(before, handling)


def _counter(metrics_text, handling):
    m = re.search(r'vllm_ext_tool_pauses_total\{handling="%s"\} ([0-9.]+)' % handling,
                  metrics_text)
    return float(m.group(1)) if m else 0.0


def test_chat_completion_runs_its_calls(server):
    task = TASKS[0]
    resp = httpx.post(server + "/v1/chat/completions", timeout=120, json={
        "model": "bench", "messages": [{"role": "user", "content": task.prompt}],
        "max_tokens": 160, "temperature": 0, "vllm_xargs": {"ext_tools": True}})
    assert resp.status_code == 200, resp.text
    data = resp.json()
    content = data["choices"][0]["message"]["content"]
    assert content.count("<result>") == len(data["vllm_ext"]["tool_calls"]) > 0
    assert check_answer(task, content)


def test_requests_the_loop_cannot_serve_get_400(server):
    for extra, word in (({"stop": ["x"]}, "stop"), ({"n": 2}, "n=")):
        resp = complete(server, "hi", **extra)
        assert resp.status_code == 400 and word in resp.json()["error"]["message"]
    bad = httpx.post(server + "/v1/completions", json={
        "model": "bench", "prompt": "hi", "vllm_xargs": {"ext_tools": "yes"}})
    assert bad.status_code == 400 and "ext_tools" in bad.json()["error"]["message"]


@pytest.mark.parametrize("handling", ["preserve", "discard"])
def test_disconnect_while_paused_frees_everything(server, handling):
    set_handling(server, handling)
    baseline = state(server)["free_blocks"]
    task = next(t for t in TASKS if t.kind == "lookup")  # lookup waits 0.3 s per call
    body = {"model": "bench", "prompt": prompt_text(task), "max_tokens": 160,
            "temperature": 0, "stream": True, "vllm_xargs": {"ext_tools": True}}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as resp:
        seen = ""
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                seen += "".join(c["text"] for c in json.loads(line[6:]).get("choices") or [])
            if "</call>" in seen:
                break  # leave while the request waits on its first call
    now = wait_drained(lambda: state(server), baseline)
    assert now["requests"] == 0 and now["free_blocks"] == baseline
    assert now["per_request"]["tool_paused"] == 0 and now["per_request"]["tool_sessions"] == 0
    assert now["paused_sessions"] == 0  # vLLM's slot count for paused sessions is balanced
    set_handling(server, "preserve")


def test_lamps_with_peak_admission_serves_every_request_unchanged(server):
    """lamps (switched live) with --ext-lamps-admission peak: concurrent tool and plain
    requests all finish with the greedy text they have under fcfs, and nothing is left."""
    set_handling(server, "preserve")
    baseline = state(server)["free_blocks"]
    prompts = [prompt_text(t) for t in TASKS + generate_tasks(4, seed=5, kinds=["sort", "add"])]
    expected = [complete(server, p).json()["choices"][0]["text"] for p in prompts]
    set_live(server, TOKEN, policy="lamps", lamps_admission="peak")
    try:
        with ThreadPoolExecutor(8) as pool:
            resps = list(pool.map(lambda p: complete(server, p), prompts * 2))
    finally:
        set_live(server, TOKEN, policy="fcfs", lamps_admission="vllm")
    assert [r.status_code for r in resps] == [200] * len(resps)
    assert [r.json()["choices"][0]["text"] for r in resps] == expected * 2
    now = wait_drained(lambda: state(server), baseline)
    assert now["requests"] == 0 and now["free_blocks"] == baseline
