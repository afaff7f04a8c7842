"""DUCHESS e2e: multi-branch requests on `vllm-ext serve --ext-branches duchess` (one server).

Checked: a duchess request returns one completion whose answer is the vote's, with branch
stats and usage counting every branch; the shipped correctness probe's scores reach the plan
(thresholds that must terminate and fork do); sc is deterministic and streams the same text;
chat works; bad settings get 400; a client that disconnects mid-request leaves no engine
request and every KV block back; the counters on /metrics.
"""
import json
import time

import httpx
import pytest
from conftest import wait_drained

from vllm_ext.testbed.tasks import generate_tasks, parse_answer, prompt_text

pytestmark = pytest.mark.e2e
TOKEN = "branches-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TASK = generate_tasks(1, seed=11, kinds=["add"], difficulties=[2])[0]


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    from vllm_ext.bench.servers import running_server

    flags = ("--enforce-eager --max-model-len 512 --max-num-seqs 16 --ext-branches duchess "
             f"--ext-probe-every 2 --ext-admin-token {TOKEN}")
    with running_server("ext", model_path, flags,
                        tmp_path_factory.mktemp("log") / "server.log", timeout_s=300) as running:
        yield running.url


def complete(server, n=4, path="/v1/completions", **extra):
    body = {"model": "bench", "max_tokens": 160, "temperature": 1.0, "n": n, "seed": 3,
            **extra}
    if path.endswith("completions") and "messages" not in body:
        body.setdefault("prompt", prompt_text(TASK))
    return httpx.post(server + path, json=body, timeout=180)


def state(server):
    return httpx.get(server + "/v1/ext/admin/state", headers=AUTH).json()["scheduler"]


def test_duchess_returns_the_voted_answer_with_branch_stats(server):
    resp = complete(server, n=4)  # --ext-branches duchess: the default for n > 1
    assert resp.status_code == 200, resp.text
    data = resp.json()
    (choice,) = data["choices"]
    stats = data["vllm_ext"]["branches"]
    assert stats["mode"] == "duchess"
    assert stats["finished"] >= 1 and stats["branches_run"] >= 1
    assert stats["finished"] + stats["terminated"] + stats["cancelled"] == stats["branches_run"]
    assert stats["answer"] == parse_answer(choice["text"])
    assert max(stats["votes"], key=stats["votes"].get) is not None
    assert data["usage"]["completion_tokens"] == stats["tokens"]
    assert stats["tokens"] >= len(choice["text"]) // 8  # all branches, not just the chosen one


def test_probe_scores_drive_terminations_and_forks(server):
    """tau = 1 terminates every branch at its first round (P(correct) < 1 always) unless it
    is the last one alive; dup_tau = 0 forks a branch into every freed slot: both can only
    happen if the probe's p_correct reached the plan."""
    resp = complete(server, n=2, max_tokens=64, ignore_eos=True, vllm_xargs={
        "ext_branches": "duchess", "ext_branch_tau": 1.0, "ext_branch_patience": 1,
        "ext_branch_dup_tau": 0.0, "ext_branch_max": 6, "ext_branch_start": 0})
    assert resp.status_code == 200, resp.text
    stats = resp.json()["vllm_ext"]["branches"]
    assert stats["terminated"] >= 1 and stats["duplicated"] >= 1
    assert stats["branches_run"] <= 6 and stats["finished"] >= 1
    assert stats["weighted_votes"] == {} or all(0 < v < 7 for v in
                                                stats["weighted_votes"].values())


def test_self_consistency_is_deterministic_streams_the_same_and_serves_chat(server):
    xargs = {"ext_branches": "sc"}
    # vLLM refuses n > 1 at temperature 0; top_k = 1 samples greedily
    first = complete(server, n=3, top_k=1, vllm_xargs=xargs).json()
    again = complete(server, n=3, top_k=1, vllm_xargs=xargs).json()
    assert first["choices"][0]["text"] == again["choices"][0]["text"]
    stats = first["vllm_ext"]["branches"]
    assert stats["branches_run"] == stats["finished"] == 3 and sum(stats["votes"].values()) == 3
    text, ext = "", None
    with httpx.stream("POST", server + "/v1/completions", timeout=180, json={
            "model": "bench", "prompt": prompt_text(TASK), "max_tokens": 160, "top_k": 1,
            "n": 3, "seed": 3, "stream": True, "vllm_xargs": xargs}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                text += "".join(c["text"] for c in event.get("choices") or [])
                ext = event.get("vllm_ext", ext)
    assert text == first["choices"][0]["text"] and ext["branches"]["mode"] == "sc"
    chat = complete(server, n=2, path="/v1/chat/completions", vllm_xargs={"ext_branches": "esc"},
                    messages=[{"role": "user", "content": prompt_text(TASK)}])
    assert chat.status_code == 200, chat.text
    assert len(chat.json()["choices"]) == 1
    assert chat.json()["vllm_ext"]["branches"]["mode"] == "esc"


@pytest.mark.parametrize("xargs, extra, needle", [
    ({"ext_branches": "vote"}, {}, "ext_branches"),
    ({"ext_branches": "duchess", "ext_branch_tau": 5}, {}, "branch-tau"),
    ({"ext_branches": "sc", "ext_branch_start": "x"}, {}, "ext_branch_start"),
    ({"ext_branches": "sc"}, {"logprobs": 2}, "logprobs"),
    ({"ext_branches": "sc", "ext_tools": True}, {"n": 1}, "cannot be combined"),
])
def test_bad_branch_requests_get_400(server, xargs, extra, needle):
    resp = complete(server, vllm_xargs=xargs, **{"n": 2, **extra})
    assert resp.status_code == 400 and needle in resp.json()["error"]["message"], resp.text


def test_disconnect_aborts_every_branch(server):
    baseline = state(server)["free_blocks"]
    body = {"model": "bench", "prompt": prompt_text(TASK), "max_tokens": 400, "n": 6,
            "temperature": 1.0, "ignore_eos": True, "stream": True,
            "vllm_xargs": {"ext_branches": "sc"}}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60):
        deadline = time.time() + 60
        while state(server)["requests"] < 6 and time.time() < deadline:
            time.sleep(0.2)
        assert state(server)["requests"] == 6  # all branches run as engine requests
    now = wait_drained(lambda: state(server), baseline)
    assert now["requests"] == 0 and now["free_blocks"] == baseline
    later = complete(server, n=2, max_tokens=8, vllm_xargs={"ext_branches": "sc"})
    assert later.status_code == 200  # and the server keeps serving


def test_branch_counters_on_metrics(server):
    text = httpx.get(server + "/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("vllm_ext_branch")]
    assert any(line.startswith('vllm_ext_branch_requests_total{mode="duchess"}')
               for line in lines), lines
    tokens = [float(line.split()[-1]) for line in lines
              if line.startswith("vllm_ext_branch_tokens_total")]
    assert tokens and all(t > 0 for t in tokens)
    assert "# TYPE vllm_ext_branches_total counter" in text
