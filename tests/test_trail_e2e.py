"""TRAIL in the engine (CPU, embedded model): short requests overtake long ones; a corrupt
probe falls back to FCFS and every request still completes; a probe for another model is
refused at start-up with exit code 2.

The probe here is crafted, not trained, so the test is deterministic on any weights: its
prompt model predicts length from prompt length (long prompts -> long outputs) and its hidden
state probe puts all mass on the top bin (every running request looks long). Probe quality is
measured by `vllm-ext train-probe` and the benchmark, not here.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import run_engine_job

pytestmark = pytest.mark.e2e
EDGES = [0.0, 8.0, 16.0, 32.0, 64.0, 128.0]


def crafted_length_probe(model_path, path, fingerprint=None):
    from transformers import AutoConfig

    from vllm_ext.probes.base import Probe, model_fingerprint, save_probe

    config = AutoConfig.from_pretrained(model_path)
    module = torch.nn.Linear(config.hidden_size, len(EDGES) - 1)
    with torch.no_grad():
        module.weight.zero_()
        module.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0]))
    coef = np.zeros(66)
    coef[0], coef[1] = -60.0, 40.0        # 4-token prompt -> ~4, 30-token prompt -> ~77
    probe = Probe("length", 1, [f"bin{i}" for i in range(len(EDGES) - 1)], module,
                  fingerprint or model_fingerprint(config, model_path), "linear",
                  meta={"output": "softmax", "bin_edges": EDGES,
                        "prompt_model": {"coef": coef.tolist(), "buckets": 64}})
    save_probe(path, probe)


def _requests():
    longs = [{"id": f"long{i}", "prompt": f"please write a long story number {i} now",
              "max_tokens": 60, "ignore_eos": True} for i in range(3)]
    shorts = [{"id": f"short{i}", "prompt": f"hi{i}", "max_tokens": 4, "ignore_eos": True,
               "after_step": 2} for i in range(3)]
    return longs + shorts


def test_trail_short_request_finishes_before_long_ones(model_path, tmp_path):
    crafted_length_probe(model_path, tmp_path / "len.pt")
    common = {"model": model_path, "max_num_seqs": 2, "requests": _requests(),
              "scheduler": "ext", "worker": "ext"}
    trail = run_engine_job({**common, "ext": {"policy": "trail", "probe_every": 4,
                                              "probe_paths": [str(tmp_path / "len.pt")]}})
    fcfs = run_engine_job({**common, "ext": {"policy": "fcfs"}})
    assert sorted(trail["finish_order"][:3]) == ["short0", "short1", "short2"]
    assert fcfs["finish_order"][:2] == ["long0", "long1"]
    assert all(len(trail["token_ids"][r["id"]]) == r["max_tokens"] for r in _requests())


def test_corrupt_probe_falls_back_to_fcfs(model_path, tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    result = run_engine_job({"model": model_path, "max_num_seqs": 2, "requests": _requests(),
                             "scheduler": "ext", "worker": "ext",
                             "ext": {"policy": "trail", "probe_paths": [str(tmp_path / "bad.pt")]}})
    assert sorted(result["finish_order"]) == sorted(r["id"] for r in _requests())
    assert result["finish_order"][:2] == ["long0", "long1"]  # FCFS order
    assert "falling back to FCFS" in result["_log"] and "cannot read probe file" in result["_log"]


def test_probe_for_another_model_refused_at_startup(model_path, tmp_path):
    crafted_length_probe(model_path, tmp_path / "other.pt", fingerprint="0123456789abcdef")
    proc = subprocess.run([sys.executable, "-m", "vllm_ext.cli", "serve", model_path,
                           "--ext-policy", "trail", "--ext-probe", str(tmp_path / "other.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--ext-probe" in proc.stderr and "0123456789abcdef" in proc.stderr
