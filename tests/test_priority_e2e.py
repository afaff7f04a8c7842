"""vLLM's request `priority` through the OpenAI server: lower value first, the policy's order
within a level (oracle, trail, hrrn), and ignored by fcfs (stock vLLM's FCFS queue).

vLLM 0.32 takes `priority` on /v1/completions with its default FCFS queue (no
``--scheduling-policy priority`` needed; that flag replaces the FCFS queue, and then our
policies order the running set only). One small server for the module: one slot
(``--max-num-seqs 1``), so requests run one at a time and finish in the order the scheduler
admits them. Each round occupies the slot with a long request (priority -1: nothing may
preempt it), queues four requests of different priorities and lengths while it runs, in an
arrival order no other rule produces, and reads their completion order.
"""
import asyncio

import httpx
import pytest

pytestmark = pytest.mark.e2e
MODEL = "bench"
TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# (name, priority, output tokens), in arrival order: FCFS gives a-b-c-d, SRPT without
# priorities a-b-d-c, priority then SRPT d-c-b-a
JOBS = (("a", 2, 4), ("b", 1, 6), ("c", 0, 12), ("d", 0, 8))
LEVELS = [{"c", "d"}, {"b"}, {"a"}]


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    from vllm_ext.bench.servers import running_server

    flags = (f"--enforce-eager --max-model-len 512 --max-num-seqs 1 --ext-policy oracle "
             f"--ext-admin-token {TOKEN}")
    with running_server("ext", model_path, flags,
                        tmp_path_factory.mktemp("log") / "server.log", timeout_s=600) as running:
        yield running.url


def _body(prompt, priority, n, stream=False):
    return {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0.0,
            "ignore_eos": True, "priority": priority, "stream": stream,
            "vllm_xargs": {"ext_true_output_len": n}}


async def _round(server, policy):
    async with httpx.AsyncClient(timeout=120) as client:
        switched = await client.post(server + "/v1/ext/admin/config", headers=AUTH,
                                     json={"config": {"policy": policy}, "drain": True})
        assert switched.status_code == 200 and switched.json()["config"]["active_policy"] == policy
        started, order = asyncio.Event(), []

        async def occupy():
            async with client.stream("POST", server + "/v1/completions",
                                     json=_body("long job 12+34=", -1, 200, True)) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        started.set()
            order.append("long")

        async def job(name, priority, n):
            resp = await client.post(server + "/v1/completions",
                                     json=_body(f"job {name} 7*6=", priority, n))
            resp.raise_for_status()
            assert resp.json()["usage"]["completion_tokens"] == n
            order.append(name)

        long = asyncio.create_task(occupy())
        await asyncio.wait_for(started.wait(), 60)    # the long request holds the slot
        jobs = []
        for spec in JOBS:
            jobs.append(asyncio.create_task(job(*spec)))
            await asyncio.sleep(0.05)                  # a fixed arrival order
        queued = 0
        while queued < 1 + len(JOBS) and not long.done():  # every job reached the engine
            state = await client.get(server + "/v1/ext/admin/state", headers=AUTH)
            queued = state.json()["scheduler"]["requests"]
            await asyncio.sleep(0.02)
        assert queued == 1 + len(JOBS), "the long request ended before the jobs were queued"
        await asyncio.gather(long, *jobs)
        state = (await client.get(server + "/v1/ext/admin/state", headers=AUTH)).json()
    assert not any(state["scheduler"]["per_request"].values()), state  # nothing left behind
    assert order[0] == "long"
    return order[1:]


def _levels(order):
    return [set(order[:2]), {order[2]}, {order[3]}]


def test_priority_first_then_the_policys_order_through_the_server(server):
    orders = {policy: asyncio.run(_round(server, policy))
              for policy in ("oracle", "trail", "hrrn", "fcfs")}
    assert orders["oracle"] == ["d", "c", "b", "a"], orders   # priority, then true length
    for policy in ("trail", "hrrn"):                            # priority, then predictions
        assert _levels(orders[policy]) == LEVELS, orders
    assert orders["fcfs"] == ["a", "b", "c", "d"], orders     # stock FCFS ignores priority
