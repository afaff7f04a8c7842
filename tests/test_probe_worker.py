"""ProbeWorker's hand-off of probe values (no engine): the probe runs in the step, on CPU as on
a GPU, and an async output carries the values when it is resolved (no probe work in vLLM's
output thread)."""
from types import SimpleNamespace

import torch

from vllm_ext.worker.channel import PredictionStore
from vllm_ext.worker.probe_worker import ProbeWorker


class _Probe:
    layer, output_names = 0, ["bin0", "bin1"]

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.calls = fail, 0

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail:
            raise RuntimeError("probe broke")
        return torch.stack([hidden[:, 0], hidden[:, 1]], dim=1)


def _worker(probe: _Probe, device: str = "cpu") -> ProbeWorker:
    worker = object.__new__(ProbeWorker)  # no model: only the hand-off is under test
    worker.device, worker.ext_probes, worker.ext_store = torch.device(device), [probe], PredictionStore()
    return worker


def _pending(rows: torch.Tensor):
    return ["a", "b"], {0: rows}


def test_async_output_is_probed_in_the_step_and_carries_the_values():
    probe = _Probe()
    worker = _worker(probe)
    resolved = []
    worker.ext_pending = _pending(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    output = SimpleNamespace(get_output=lambda: resolved.append(1) or SimpleNamespace())
    returned = worker._attach(output)
    assert probe.calls == 1 and not resolved                # in the step, before resolution
    assert worker.ext_store.entries["a"].latest == {"bin0": 0.25, "bin1": 0.75}
    result = returned.get_output()
    assert resolved == [1] and probe.calls == 1             # resolving runs no probe
    assert result.probe_values == {"a": {"bin0": 0.25, "bin1": 0.75},
                                   "b": {"bin0": 0.5, "bin1": 0.5}}
    assert worker.ext_pending is None


def test_sync_output_gets_values_at_once_and_no_output_keeps_them_pending():
    probe = _Probe()
    worker = _worker(probe)
    worker.ext_pending = _pending(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert worker._attach(SimpleNamespace()) is not None    # execute_model before sampling
    assert worker.ext_pending is not None and probe.calls == 0
    output = worker._attach(SimpleNamespace(sampled_token_ids=[[1], [2]]))
    assert output.probe_values["b"] == {"bin0": 0.0, "bin1": 1.0} and probe.calls == 1


def test_failing_probe_is_disabled_and_the_output_still_resolves():
    worker = _worker(_Probe(fail=True))
    worker.ext_pending = _pending(torch.ones(2, 2))
    result = worker._attach(SimpleNamespace(get_output=lambda: SimpleNamespace())).get_output()
    assert result.probe_values == {} and worker.ext_probes == []


# ---- the probe cadence through execute_model (no engine) ------------------------------------
class StepDriver:
    """Drives `ProbeWorker.execute_model` with scheduler outputs shaped like vLLM's: requests
    arrive, their prompts are prefilled (in chunks when `budget` tokens per step do not fit
    them), then decode one token a step until `max_tokens`; a finished request is named in the
    next step's ``finished_req_ids``. The base worker's forward is replaced by one that lays the
    batch out as the model runner does (``input_batch.req_ids``, ``query_start_loc``) and
    writes ``hidden(layer, req_id, position)`` into the hooked layers' buffers for every
    scheduled token, so each probe value says which token's row it read."""

    def __init__(self, monkeypatch, worker: ProbeWorker, hidden, budget: int = 1 << 20):
        from vllm_ext.worker import probe_worker

        self.worker, self.hidden, self.budget = worker, hidden, budget
        self.step = 0
        self.reqs: dict[str, dict] = {}    # running: prompt, computed tokens, outputs, max
        self.finished: set[str] = set()    # to report in the next step
        self.outputs: list = []            # each step's output (probe_values)
        worker.model_runner = SimpleNamespace(
            input_batch=SimpleNamespace(req_ids=[], num_reqs=0),
            query_start_loc=SimpleNamespace(cpu=torch.zeros(1, dtype=torch.int32)))
        monkeypatch.setattr(probe_worker._BaseWorker, "execute_model", self._forward,
                            raising=False)

    def add(self, req_id: str, prompt_len: int, max_tokens: int, extra_args=None) -> None:
        self.reqs[req_id] = {"prompt": prompt_len, "done": 0, "out": 0, "max": max_tokens,
                             "extra": extra_args, "new": True}

    def _forward(self, scheduler_output):
        runner, starts = self.worker.model_runner, [0]
        ids = list(scheduler_output.num_scheduled_tokens)
        for req_id in ids:
            req, n = self.reqs[req_id], scheduler_output.num_scheduled_tokens[req_id]
            for t in range(n):
                for layer, buf in self.worker.ext_buffers.items():
                    buf[starts[-1] + t] = self.hidden(layer, req_id, req["done"] + t)
            starts.append(starts[-1] + n)
        runner.input_batch.req_ids, runner.input_batch.num_reqs = ids, len(ids)
        runner.query_start_loc.cpu = torch.tensor(starts + [starts[-1]] * 4, dtype=torch.int32)
        return SimpleNamespace(sampled_token_ids=[[0] for _ in ids])

    def run_step(self):
        """One engine step; returns the step's output (``probe_values`` if probes ran)."""
        self.step += 1
        budget, sched, new = self.budget, {}, []
        for req_id, req in self.reqs.items():
            if budget <= 0:
                break
            want = req["prompt"] - req["done"] if req["done"] < req["prompt"] else 1
            sched[req_id] = take = min(want, budget)
            budget -= take
            if req["new"]:
                new.append(SimpleNamespace(
                    req_id=req_id, prompt_token_ids=list(range(req["prompt"])),
                    num_computed_tokens=0, sampling_params=SimpleNamespace(
                        extra_args=req["extra"])))
                req["new"] = False
        out = SimpleNamespace(
            scheduled_new_reqs=new, num_scheduled_tokens=sched, preempted_req_ids=set(),
            total_num_scheduled_tokens=sum(sched.values()), finished_req_ids=self.finished)
        self.finished = set()
        output = self.worker.execute_model(out)
        for req_id, n in sched.items():
            req = self.reqs[req_id]
            req["done"] += n
            if req["done"] >= req["prompt"]:  # a token is sampled only once the prompt is in
                req["out"] += 1
            if req["out"] >= req["max"]:
                self.finished.add(req_id)
                del self.reqs[req_id]
        self.outputs.append(output)
        return output


def _cadence_worker(every: int, capture_layers=(), probe=True) -> ProbeWorker:
    from vllm_ext.config import ExtConfig
    from vllm_ext.worker.channel import CaptureLog

    worker = object.__new__(ProbeWorker)
    worker.device = torch.device("cpu")
    worker.ext_config = ExtConfig(probe_every=every, probe_paths=("p.pt",) if probe else (),
                                  probe_history=True, capture_layers=tuple(capture_layers))
    worker.ext_store = PredictionStore(keep_history=True)
    worker.ext_step, worker.ext_awaiting = 0, set()
    worker.ext_prefill, worker.ext_partial = {}, set()  # as load_model sets them
    worker.ext_probes = [_Probe()] if probe else []
    worker.ext_capture = CaptureLog(worker.ext_config.capture_layers)
    layers = {0} | set(capture_layers) if probe else set(capture_layers)
    worker.ext_buffers = {layer: torch.zeros(64, 2) for layer in layers}
    return worker


def _code(req_id: str) -> float:
    return float(ord(req_id[0]))


def _position_hidden(layer, req_id, position):
    return torch.tensor([_code(req_id), float(position)])


def _probed(driver) -> dict[int, set[str]]:
    return {step: set(out.probe_values) for step, out in enumerate(driver.outputs, 1)
            if getattr(out, "probe_values", None)}


def test_probe_every_3_runs_on_every_third_step_and_at_each_prefill_end(monkeypatch):
    worker = _cadence_worker(every=3)
    driver = StepDriver(monkeypatch, worker, _position_hidden)
    plan = {1: [("A", 3, 8)], 2: [("B", 2, 10)], 5: [("C", 4, 4)]}
    for step in range(1, 13):
        for req in plan.get(step, []):
            driver.add(*req)
        driver.run_step()
    # A runs steps 1-8, B 2-11, C 5-8: every 3rd step probes all running requests, a
    # request's first step probes it alone; steps 4, 7, 8, 10, 11 and 12 probe nobody
    assert _probed(driver) == {1: {"A"}, 2: {"B"}, 3: {"A", "B"}, 5: {"C"},
                               6: {"A", "B", "C"}, 9: {"B"}}
    assert (worker.ext_probe_runs, worker.ext_probe_rows) == (6, 9)
    runs = {r: e.steps for r, e in worker.ext_store.entries.items()}
    assert runs == {"A": 3, "B": 4, "C": 2}
    # each value is the row of the request's last scheduled token: the last prompt token at
    # its prefill end, then the token fed in at that decode step
    positions = {r: [v["bin1"] for v in e.history] for r, e in worker.ext_store.entries.items()}
    assert positions == {"A": [2, 4, 7], "B": [1, 2, 5, 8], "C": [3, 4]}
    assert all(v["bin0"] == _code(r) for r, e in worker.ext_store.entries.items()
               for v in e.history)
    assert worker.ext_awaiting == set()


def test_initial_probe_waits_for_the_end_of_a_chunked_prefill(monkeypatch):
    """A 10-token prompt prefilled as 6 + 4 tokens (budget 7, one decoding request): the
    initial probe reads the last prompt token (position 9) in the step the prefill ends, not
    the last token of the first chunk; a k-th step in the middle of the prefill skips it."""
    worker = _cadence_worker(every=2)
    driver = StepDriver(monkeypatch, worker, _position_hidden, budget=7)
    driver.add("A", 1, 6)
    driver.run_step()                         # step 1: A's prefill
    driver.add("D", 10, 3)
    driver.run_step()                         # step 2 (k-th): A decodes, D's first 6 tokens
    driver.run_step()                         # step 3: A decodes, D's last 4 tokens
    driver.run_step()                         # step 4 (k-th)
    assert _probed(driver) == {1: {"A"}, 2: {"A"}, 3: {"D"}, 4: {"A", "D"}}
    assert [v["bin1"] for v in worker.ext_store.entries["D"].history] == [9, 10]
    assert "D" not in worker.ext_awaiting


def test_capture_rows_are_one_per_generated_token_with_chunked_prefill(monkeypatch):
    """Capture mode: row 0 is the end of prefill, row j decode step j, for every request, also
    one whose prefill is chunked (`probes.collect` checks rows == output tokens)."""
    from vllm_ext.worker.channel import TAG_KEY, decode_rows

    worker = _cadence_worker(every=8, capture_layers=(1, 3), probe=False)
    driver = StepDriver(monkeypatch, worker,
                        lambda layer, r, p: torch.tensor([_code(r) + layer, float(p)]), budget=8)
    driver.add("A", 3, 5, {TAG_KEY: "tag-a"})
    driver.add("B", 12, 4, {TAG_KEY: "tag-b"})  # 12 > budget - 3: prefilled in 3 chunks
    while driver.reqs:
        driver.run_step()
    drained = worker.ext_drain_capture()
    assert drained["layers"] == [1, 3] and set(drained["rows"]) == {"tag-a", "tag-b"}
    a, b = (decode_rows(drained["rows"][t]) for t in ("tag-a", "tag-b"))
    assert a.shape == (5, 2, 2) and b.shape == (4, 2, 2)
    assert a[:, 0, 1].tolist() == [2, 3, 4, 5, 6] and b[:, 0, 1].tolist() == [11, 12, 13, 14]
    assert a[:, 1, 0].tolist() == [_code("A") + 3] * 5
    assert worker.ext_capture.rows == {}
