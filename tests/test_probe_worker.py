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
