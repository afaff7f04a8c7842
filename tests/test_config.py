"""ExtConfig validation and the `vllm-ext` CLI's flag errors (no engine needed)."""
import json
import os
import subprocess
import sys

import pytest

from vllm_ext.cli import _merge_additional_config, ext_arg_parser, ext_config_from_args
from vllm_ext.config import ExtConfig, ExtConfigError


def test_roundtrip_through_additional_config():
    cfg = ExtConfig(policy="oracle", preemption_margin=3.0, probe_paths=("/x.pt",))
    blob = json.loads(cfg.to_additional_config())
    assert ExtConfig.from_dict(blob["vllm_ext"]) == cfg


@pytest.mark.parametrize("data, needle", [
    ({"polcy": "fcfs"}, "polcy"),
    ({"policy": "sjf"}, "--ext-policy"),
    ({"probe_every": 0}, "--ext-probe-every"),
    ({"probe_every": 1.5}, "--ext-probe-every"),
    ({"preemption_margin": "abc"}, "--ext-preemption-margin"),
    ({"probe_history": "yes"}, "--ext-probe-history"),
    ({"kv_bits": 3}, "--ext-kv-bits"),
])
def test_bad_settings_name_the_key(data, needle):
    with pytest.raises(ExtConfigError, match=needle):
        ExtConfig.from_dict(data)


def test_from_vllm_config_reads_additional_config():
    class Fake:
        additional_config = {"vllm_ext": {"policy": "oracle"}, "other": 1}
    assert ExtConfig.from_vllm_config(Fake()).policy == "oracle"
    Fake.additional_config = {}
    assert ExtConfig.from_vllm_config(Fake()) == ExtConfig()


def test_cli_flags_to_config_and_merge():
    ns, rest = ext_arg_parser().parse_known_args(
        ["m", "--ext-policy", "oracle", "--max-num-seqs", "4", "--ext-probe-every", "8"])
    assert rest == ["m", "--max-num-seqs", "4"]
    cfg = ext_config_from_args(ns)
    assert (cfg.policy, cfg.probe_every) == ("oracle", 8)
    argv = _merge_additional_config(["m", "--additional-config", '{"a": 1}'], cfg)
    merged = json.loads(argv[argv.index("--additional-config") + 1])
    assert merged["a"] == 1 and merged["vllm_ext"]["policy"] == "oracle"


@pytest.mark.parametrize("args, flag", [
    (["--ext-policy", "bogus"], "--ext-policy"),
    (["--ext-frobnicate", "1"], "--ext-frobnicate"),
    (["--ext-probe-every", "0"], "--ext-probe-every"),
    (["--ext-kv-bits", "5"], "--ext-kv-bits"),
])
def test_cli_bad_flag_exits_2_naming_it(args, flag):
    proc = subprocess.run([sys.executable, "-m", "vllm_ext.cli", "serve", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert flag in proc.stderr


def test_cli_help_lists_ext_flags():
    proc = subprocess.run([sys.executable, "-m", "vllm_ext.cli", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--ext-policy", "--ext-probe", "--ext-moe-router", "--ext-kv-bits"):
        assert flag in proc.stdout


def test_serve_takes_an_embedded_model_by_name():
    from vllm_ext.cli import build_vllm_argv
    from vllm_ext.testbed.model import MODEL_NAMES

    argv = build_vllm_argv(["tiny-moe-finegrained", "--port", "1"], ExtConfig())
    assert argv[0] == str(MODEL_NAMES["tiny-moe-finegrained"])
    assert argv[argv.index("--served-model-name") + 1] == "tiny-moe-finegrained"
    named = build_vllm_argv(["tiny-moe-finegrained", "--served-model-name", "x"], ExtConfig())
    assert named.count("--served-model-name") == 1
    assert build_vllm_argv(["some/hub-model"], ExtConfig())[0] == "some/hub-model"


def test_serve_leaves_an_explicit_kv_cache_size_to_the_flag(monkeypatch):
    """vLLM's CPU platform lets VLLM_CPU_KVCACHE_SPACE override --kv-cache-memory-bytes, so the
    1 GiB default is only set when the flag is absent (else the flag would be ignored)."""
    from vllm_ext.cli import build_vllm_argv

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "")  # records the original for teardown
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    build_vllm_argv(["--kv-cache-memory-bytes", "12582912"], ExtConfig())
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    build_vllm_argv([], ExtConfig())
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
