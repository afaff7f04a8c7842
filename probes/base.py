"""The probe file: a tiny torch module over one decoder layer's residual stream.

A probe file (``torch.save`` of a plain dict) holds the architecture (``linear`` or ``mlp``),
its state dict, the layer it reads, the names of its outputs and the fingerprint of the model
it was trained on. The engine refuses a probe whose fingerprint does not match the served
model, so a probe trained for one model is never silently applied to another.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT_VERSION = 1


class ProbeError(RuntimeError):
    """A probe file that cannot be used (missing, corrupt, or for another model)."""


class ProbeModelMismatch(ProbeError):
    """A valid probe file trained for a different model."""


def model_fingerprint(hf_config: Any, model_path: str | None = None) -> str:
    """Identity of a model: architecture + vocabulary from its HF config and, when the model
    is a local folder, its safetensors files (size and last 64 KiB of weights of each), so a
    probe trained on one checkpoint is refused on a retrained one of the same shape."""
    fields = [getattr(hf_config, "model_type", "?")]
    for name in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
                 "intermediate_size", "num_local_experts"):
        fields.append(f"{name}={getattr(hf_config, name, None)}")
    digest = hashlib.sha256("|".join(map(str, fields)).encode())
    if model_path and Path(model_path).is_dir():
        for f in sorted(Path(model_path).glob("*.safetensors")):
            size = f.stat().st_size
            with open(f, "rb") as fh:
                fh.seek(max(0, size - 65536))
                digest.update(f"{f.name}:{size}".encode() + fh.read())
    return digest.hexdigest()[:16]


def build_module(arch: str, d_in: int, d_out: int, hidden: int = 512) -> nn.Module:
    if arch == "linear":
        return nn.Linear(d_in, d_out)
    if arch == "mlp":
        return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))
    raise ProbeError(f"unknown probe architecture {arch!r}")


@dataclass
class Probe:
    kind: str
    layer: int
    output_names: list[str]
    module: nn.Module
    fingerprint: str
    arch: str
    meta: dict = field(default_factory=dict)  # e.g. bins, {"output": "softmax"}, prompt model

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.module(hidden.float())
        kind = self.meta.get("output")
        if kind == "softmax":  # the length probe: a distribution over length bins
            return out.softmax(-1)
        if kind == "sigmoid":  # the correctness probe: P(the branch ends correct)
            return out.sigmoid()
        return out


def save_probe(path: str | Path, probe: Probe, hidden: int = 512) -> None:
    first = next(probe.module.parameters())
    if probe.arch == "mlp":
        hidden = first.shape[0]
    torch.save({
        "format": FORMAT_VERSION, "kind": probe.kind, "layer": probe.layer,
        "output_names": list(probe.output_names), "fingerprint": probe.fingerprint,
        "arch": probe.arch, "d_in": first.shape[1], "d_out": len(probe.output_names),
        "hidden": hidden, "state_dict": probe.module.state_dict(), "meta": probe.meta,
    }, path)


def load_probe(path: str | Path, expected_fingerprint: str | None = None) -> Probe:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, truncated, not a torch file
        raise ProbeError(f"cannot read probe file {path}: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT_VERSION:
        raise ProbeError(f"{path} is not a vllm-ext probe file (format {FORMAT_VERSION})")
    if expected_fingerprint is not None and blob["fingerprint"] != expected_fingerprint:
        raise ProbeModelMismatch(
            f"probe {path} was trained for model fingerprint {blob['fingerprint']}, "
            f"but the served model is {expected_fingerprint}; retrain it with "
            f"`vllm-ext train-probe` on this model")
    module = build_module(blob["arch"], blob["d_in"], blob["d_out"], blob.get("hidden", 512))
    try:
        module.load_state_dict(blob["state_dict"])
    except Exception as exc:
        raise ProbeError(f"probe {path} has bad weights: {exc}") from exc
    return Probe(kind=blob["kind"], layer=int(blob["layer"]), output_names=list(blob["output_names"]),
                 module=module.eval(), fingerprint=blob["fingerprint"], arch=blob["arch"],
                 meta=dict(blob.get("meta") or {}))


def shipped_probe_path(kind: str, fingerprint: str) -> Path | None:
    """The probe shipped in the package for this model, if any (``{kind}-{fingerprint}.pt``)."""
    import vllm_ext

    path = Path(vllm_ext.__file__).resolve().parent / "assets" / "probes" / f"{kind}-{fingerprint}.pt"
    return path if path.exists() else None


def resolve_probe_paths(ext_config: Any, hf_config: Any, model_path: str | None = None) -> list[str]:
    """The probe files an engine loads: the explicit ones, else the shipped ones its config
    reads: the length probe when the policy refines on it (`trail`, `lamps`) or a live
    switch to it may come (`live_config`), the correctness probe when branches may run in
    duchess mode (`branches` not "off"), the policy is `difficulty`, or a live switch to it
    may come."""
    if ext_config.probe_paths:
        return list(ext_config.probe_paths)
    fingerprint = model_fingerprint(hf_config, model_path)
    wanted = []
    if ext_config.policy in ("trail", "lamps") or ext_config.live_config:
        wanted.append("length")
    if getattr(ext_config, "branches", "off") != "off" or ext_config.policy == "difficulty" \
            or ext_config.live_config:
        wanted.append("correctness")
    paths = [shipped_probe_path(kind, fingerprint) for kind in wanted]
    return [str(path) for path in paths if path]
