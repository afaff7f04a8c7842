"""Shared test setup: CPU engine environment, the embedded model, engine-job runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_TMP = Path(tempfile.mkdtemp(prefix="vllm-ext-tests-"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", str(_TMP / "vllm-cache"))
os.environ.setdefault("VLLM_EXT_CACHE", str(_TMP / "ext-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_path() -> str:
    """The embedded default model (trained asset if shipped, else a random tiny MoE)."""
    from vllm_ext.testbed.model import default_model_path

    return default_model_path()


def run_engine_job(spec: dict, env: dict | None = None, timeout: int = 600) -> dict:
    """Run tests/engine_job.py in a fresh process; return its JSON result.

    EngineCore runs in the job's process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so each
    `engine.step()` is exactly one engine step: arrivals and finish steps are deterministic
    even on a loaded machine."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "engine_job.py"), json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("ENGINE_JOB_RESULT "):
            result = json.loads(line[len("ENGINE_JOB_RESULT "):])
            result["_log"] = proc.stdout + proc.stderr
            return result
    tail = (proc.stdout + proc.stderr)[-4000:]
    raise AssertionError(f"engine job failed (rc={proc.returncode}):\n{tail}")


def wait_drained(read_state, baseline_blocks: int, timeout_s: float = 30.0) -> dict:
    """Poll `read_state()` (the scheduler part of /v1/ext/admin/state) until no request is
    left and every KV block is free again; return the last state (the caller asserts)."""
    import time

    deadline = time.time() + timeout_s
    while True:
        now = read_state()
        done = now["requests"] == 0 and now["free_blocks"] == baseline_blocks
        if done or time.time() > deadline:
            return now
        time.sleep(0.5)


def admin_state(server: str, token: str) -> dict:
    """The scheduler part of a live server's ``GET /v1/ext/admin/state``."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    return httpx.get(server + "/v1/ext/admin/state", headers=headers).json()["scheduler"]


def set_live(server: str, token: str, **config) -> None:
    """Switch live settings of a server (drained), asserting the admin route took them."""
    import httpx

    resp = httpx.post(server + "/v1/ext/admin/config", timeout=60,
                      headers={"Authorization": f"Bearer {token}"},
                      json={"config": config, "drain": True})
    assert resp.status_code == 200, resp.text


def set_tool_handling(server: str, token: str, handling: str) -> None:
    set_live(server, token, tool_handling=handling)


def make_linear_probe(model_path: str, layer: int, out_path: Path, seed: int = 0):
    """A probe with a known random linear map, bound to the model's fingerprint."""
    import torch
    from transformers import AutoConfig

    from vllm_ext.probes.base import Probe, model_fingerprint, save_probe

    config = AutoConfig.from_pretrained(model_path)
    torch.manual_seed(seed)
    module = torch.nn.Linear(config.hidden_size, 2)
    probe = Probe(kind="test", layer=layer, output_names=["p0", "p1"], module=module,
                  fingerprint=model_fingerprint(config, model_path), arch="linear")
    save_probe(out_path, probe)
    return probe
