"""Packaging: namespaced subpackages, plugin entry point, vLLM version guard."""
import importlib.metadata
import os
import subprocess
import sys

import pytest

from vllm_ext.compat import UnsupportedVllmVersion, check_vllm_version


def _run(code: str, cwd) -> str:
    # Run outside the checkout: only what the installed distribution provides is importable.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_no_top_level_kernels_or_server_package(tmp_path):
    # `kernels` is a Hugging Face package name that transformers probes for.
    code = ("import importlib.util as u; print([u.find_spec(n) is not None for n in "
            "('kernels', 'server', 'probes', 'vllm_ext.kernels', 'vllm_ext.probes', 'vllm_ext.server')])")
    assert _run(code, tmp_path) == "[False, False, False, True, True, True]"
    assert "kernels" not in (importlib.metadata.packages_distributions())


def test_transformers_does_not_see_our_kernels(tmp_path):
    code = ("import transformers.utils as u; import vllm_ext.kernels; "
            "print(u.is_kernels_available())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_plugin_entry_point_registered_and_idempotent():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ep = next(e for e in eps if e.name == "vllm_ext")
    register = ep.load()
    register()
    register()
    import vllm_ext
    assert vllm_ext._registered


def test_plugin_logs_through_vllm_handlers():
    """``vllm_ext.*`` INFO lines come out through vLLM's handler, also when vLLM configures
    its logger after the plugin registered (as its engine processes do)."""
    code = ("import logging, vllm.logger, vllm_ext; vllm_ext.share_vllm_logging(); "
            "vllm.logger._configure_vllm_root_logger(); "
            "logging.getLogger('vllm_ext.worker.probe_worker').info('EXT-INFO-LINE')")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CONFIGURE_LOGGING"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in (out.stdout + out.stderr).splitlines() if "EXT-INFO-LINE" in x)
    assert "INFO" in line  # vLLM's format, not Python's bare last-resort handler


def test_version_guard():
    assert check_vllm_version("0.32.0") == "0.32.0"
    assert check_vllm_version("0.32.3+cpu") == "0.32.3+cpu"
    with pytest.raises(UnsupportedVllmVersion, match="targets vLLM 0.32"):
        check_vllm_version("0.33.0")


def test_every_subpackage_is_listed_in_pyproject():
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts)
             for p in (root / "vllm_ext").rglob("__init__.py") if "__pycache__" not in p.parts}
    assert "vllm_ext.bench" in found and found <= listed, sorted(found - listed)
