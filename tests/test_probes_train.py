"""Probe training end to end without an engine: `probes.collect` drives a stand-in for vLLM's
`LLM` whose steps go through the real ProbeWorker in capture mode (`StepDriver`, with chunked
prefill), then `probes.length` trains on the captured rows; the saved probe loads, is bound
to its model, and on held-out requests predicts the remaining length far better than a
constant."""
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from test_probe_worker import StepDriver, _cadence_worker
from vllm_ext.probes.base import ProbeModelMismatch, load_probe, save_probe
from vllm_ext.probes.collect import LengthDataset, collect
from vllm_ext.probes.length import rows, split_requests, train_length_probe

HIDDEN = 8
LAYERS = [0, 1]  # layer 0: noise only; layer 1: carries the remaining length (plus noise)


def _lengths(i: int) -> tuple[int, int]:
    """(prompt tokens, output tokens) of synthetic request i."""
    return 3 + i % 5, 6 + (i * 7) % 37


class FakeLLM:
    """What `collect` uses of `vllm.LLM`, with the real ProbeWorker recording the steps."""

    monkeypatch = None

    def __init__(self, model, worker_cls, additional_config, **kwargs) -> None:
        assert worker_cls == "vllm_ext.worker.probe_worker.ProbeWorker"
        layers = additional_config["vllm_ext"]["capture_layers"]
        self.worker = _cadence_worker(every=8, capture_layers=layers, probe=False)
        self.worker.ext_buffers = {layer: torch.zeros(128, HIDDEN) for layer in layers}
        self.out_len: dict[str, int] = {}
        self.prompt_len: dict[str, int] = {}
        self.driver = StepDriver(self.monkeypatch, self.worker, self._hidden, budget=96)
        self.n = 0

    def _hidden(self, layer: int, req_id: str, position: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(f"{req_id}/{position}/{layer}".encode()))
        noise = torch.randn(HIDDEN, generator=gen)
        if layer == 1:  # step j = position - (prompt - 1): N - j tokens remain
            remaining = self.out_len[req_id] - (position - self.prompt_len[req_id] + 1)
            noise[0] = remaining / 10.0 + 0.05 * noise[0]
        return noise

    def get_tokenizer(self):
        return lambda text: SimpleNamespace(input_ids=list(range(len(text.split()))))

    def generate(self, prompts, params, use_tqdm=False):
        ids = []
        for prompt, p in zip(prompts, params):
            i = int(prompt.split()[1])
            req_id = f"engine-{self.n}"  # engine ids are not the tags: collect maps by tag
            self.n += 1
            self.prompt_len[req_id], n = _lengths(i)
            self.out_len[req_id] = min(n, p.max_tokens)
            self.driver.add(req_id, self.prompt_len[req_id], self.out_len[req_id], p.extra_args)
            ids.append(req_id)
        while self.driver.reqs:
            self.driver.run_step()
        self.driver.run_step()  # reports the last finished requests
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[0] * self.out_len[r])],
                                prompt_token_ids=list(range(self.prompt_len[r]))) for r in ids]

    def collective_rpc(self, method):
        assert method == "ext_drain_capture"
        return [self.worker.ext_drain_capture()]


@pytest.fixture(scope="module")
def dataset() -> LengthDataset:
    import vllm

    with pytest.MonkeyPatch.context() as mp:
        FakeLLM.monkeypatch = mp
        mp.setattr(vllm, "LLM", FakeLLM)
        return collect("fake-model", [{"prompt": f"task {i}", "kind": "k"} for i in range(160)],
                       LAYERS, max_tokens=40, batch=40)


def test_capture_gives_one_row_per_output_token(dataset):
    assert dataset.layers == LAYERS and len(dataset.output_len) == 160
    for i, (hidden, n) in enumerate(zip(dataset.hidden, dataset.output_len)):
        prompt, out = _lengths(i)
        assert n == min(out, 40) and hidden.shape == (n, 2, HIDDEN)
        assert dataset.prompt_ids[i] == list(range(prompt))
        # row j of the informative layer says N - j tokens remain (to fp16 and noise)
        remaining = hidden[:, 1, 0].float().numpy() * 10.0
        assert np.abs(remaining - (n - np.arange(n))).max() < 2.5
    assert dataset.meta[0] == {"kind": "k"}


def test_trained_probe_loads_and_beats_a_constant_on_held_out_requests(dataset, tmp_path):
    probe, report = train_length_probe(dataset, "fp-test", arch="mlp", k=6, every=4,
                                       log=lambda *_: None)
    assert report["best_layer"] == 1
    assert report["layer_sweep_mae"][1] < 0.5 * report["layer_sweep_mae"][0]
    split = split_requests(len(dataset.output_len))
    assert report["n_val_requests"] == len(split.val) == 32
    _, y_train = rows(dataset, split.train, 0)
    x_val, y_val = rows(dataset, split.val, 1)
    constant_mae = np.abs(y_val - y_train.mean()).mean()

    path = tmp_path / "length.pt"
    save_probe(path, probe)
    loaded = load_probe(path, "fp-test")
    assert (loaded.kind, loaded.layer, loaded.arch) == ("length", 1, "mlp")
    edges = np.asarray(loaded.meta["bin_edges"])
    pred = loaded(x_val).numpy() @ ((edges[:-1] + edges[1:]) / 2)  # softmax over bins
    mae = np.abs(pred - y_val).mean()
    assert mae < 0.35 * constant_mae, (mae, constant_mae)
    assert mae == pytest.approx(report["layer_sweep_mae"][1], rel=1e-3)
    table = report["mae"]
    assert table["per_step_probe"] < 0.35 * constant_mae
    assert table["per_step_probe"] < table["prompt_only"]
    assert set(table) == {"prompt_only", "initial_probe", "per_step_probe",
                          "trail_k4_smoothed", "trail_k4_raw"}
    with pytest.raises(ProbeModelMismatch):
        load_probe(path, "another-model")
