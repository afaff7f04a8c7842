"""vllm_xargs validation and the probe-file contract (no engine)."""
import pytest
import torch

from vllm_ext.probes.base import Probe, ProbeError, load_probe, save_probe
from vllm_ext.server.middleware import BadExtArgs, validate_xargs


@pytest.mark.parametrize("body", [
    {"prompt": "x"}, {"vllm_xargs": None}, {"vllm_xargs": {"foo": "bar"}},
    {"vllm_xargs": {"ext_true_output_len": 0, "ext_return_predictions": True}},
])
def test_valid_xargs(body):
    assert validate_xargs(body) == body.get("vllm_xargs")  # the request's own xargs, unchanged


@pytest.mark.parametrize("xargs, needle", [
    ("oops", "JSON object"), ([1, 2], "JSON object"),
    ({"ext_true_output_len": -1}, "ext_true_output_len"),
    ({"ext_true_output_len": "12"}, "ext_true_output_len"),
    ({"ext_true_output_len": True}, "ext_true_output_len"),
    ({"ext_return_predictions": "yes"}, "ext_return_predictions"),
    ({"ext_nonsense": 1}, "ext_nonsense"),
    ({"ext_tag": "mine"}, "reserved"),
])
def test_malformed_xargs_named(xargs, needle):
    with pytest.raises(BadExtArgs, match=needle):
        validate_xargs({"vllm_xargs": xargs})


def _probe(fp="abc"):
    return Probe(kind="t", layer=1, output_names=["a"], module=torch.nn.Linear(4, 1),
                 fingerprint=fp, arch="linear")


def test_probe_roundtrip(tmp_path):
    p = _probe()
    save_probe(tmp_path / "p.pt", p)
    q = load_probe(tmp_path / "p.pt", expected_fingerprint="abc")
    x = torch.randn(3, 4)
    assert torch.allclose(p(x), q(x))


def test_probe_for_other_model_rejected(tmp_path):
    save_probe(tmp_path / "p.pt", _probe("abc"))
    with pytest.raises(ProbeError, match="fingerprint abc"):
        load_probe(tmp_path / "p.pt", expected_fingerprint="zzz")


def test_corrupt_probe_rejected(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(ProbeError, match="cannot read"):
        load_probe(tmp_path / "bad.pt")
