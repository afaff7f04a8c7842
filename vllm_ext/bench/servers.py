"""Start and stop a server for one benchmark configuration (ours or stock vLLM) on loopback."""
from __future__ import annotations

import contextlib
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

STOCK = "stock"
CPU_ROLES = ("api", "engine", "worker")
# process titles vLLM sets (setproctitle); anything else in the server's tree counts as "api"
ROLES = {"VLLM::EngineCore": "engine", "VLLM::Worker": "worker"}


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time (user + system, s) used so far by a server's process tree, per role: "api"
    (the HTTP server), "engine" (EngineCore: scheduler), "worker" (model forward). Sampled
    before and after a run, the difference is what that run cost each process; on a CPU
    engine the processes share the cores, so a policy's bookkeeping shows up here (as does
    any time a process spends polling, which grows with the run's duration)."""
    import psutil

    out = dict.fromkeys(CPU_ROLES, 0.0)
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for proc in procs:
        try:
            title = " ".join(proc.cmdline()) or proc.name()
            times = proc.cpu_times()
        except psutil.Error:  # exited between the listing and the read
            continue
        role = next((r for prefix, r in ROLES.items() if title.startswith(prefix)), "api")
        out[role] += times.user + times.system
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Server:
    url: str
    pid: int

    def cpu_seconds(self) -> dict[str, float]:
        return cpu_seconds(self.pid)


def server_argv(kind: str, model: str, port: int, extra: str) -> list[str]:
    """`kind` is "stock" (vLLM's own server, no plugin classes) or "ext" (vllm-ext serve)."""
    common = ["--port", str(port), "--host", "127.0.0.1", "--served-model-name", "bench"]
    if kind == STOCK:  # this entry point ignores the positional model: pass --model
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                *common, "--dtype", "bfloat16", *shlex.split(extra)]
    return [sys.executable, "-m", "vllm_ext.cli", "serve", model, *common, *shlex.split(extra)]


@contextlib.contextmanager
def running_server(kind: str, model: str, extra: str, log_path: Path, timeout_s: float = 600,
                   env: dict | None = None):
    port = free_port()
    env = {**os.environ, **(env or {})}
    if "--kv-cache-memory-bytes" not in extra:  # the legacy env var would override the flag
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    else:  # ... so an explicit size drops it (tests/conftest.py sets it for every test)
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    log = open(log_path, "w")
    proc = subprocess.Popen(server_argv(kind, model, port, extra), stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
            if time.time() > deadline:
                raise RuntimeError(f"server not healthy after {timeout_s} s; see {log_path}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield Server(base, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
