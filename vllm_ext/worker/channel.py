"""Where the latest probe values of each request live on the worker, for the server to read.

The API server cannot get new fields through EngineCore's fixed output struct, so it asks the
workers directly with vLLM's own ``collective_rpc("ext_get_predictions", args=(tag,))``. A
request is found by the ``ext_tag`` the server's middleware puts in its ``vllm_xargs``; all
child requests of an ``n > 1`` request share the tag. Entries outlive the request (bounded
LRU), so predictions can be attached to the response after the request finished.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

TAG_KEY = "ext_tag"


@dataclass
class RequestPredictions:
    tag: str | None
    latest: dict[str, float] = field(default_factory=dict)
    first: dict[str, float] = field(default_factory=dict)  # at the end of prefill
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


class PredictionStore:
    def __init__(self, keep_history: bool = False, capacity: int = 4096) -> None:
        self.keep_history = keep_history
        self.capacity = capacity
        self.entries: OrderedDict[str, RequestPredictions] = OrderedDict()

    def start(self, req_id: str, extra_args: dict | None) -> None:
        tag = (extra_args or {}).get(TAG_KEY)
        self.entries[req_id] = RequestPredictions(tag=tag if isinstance(tag, str) else None)
        self.entries.move_to_end(req_id)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def record(self, req_id: str, values: dict[str, float]) -> None:
        entry = self.entries.get(req_id)
        if entry is None:
            entry = self.entries[req_id] = RequestPredictions(tag=None)
        entry.latest = values
        if not entry.steps:
            entry.first = values
        entry.steps += 1
        if self.keep_history:
            entry.history.append(values)

    def query(self, tag: str | None = None, req_ids: list[str] | None = None,
              tag_prefix: str | None = None) -> dict[str, dict]:
        """Entries by exact tag, by request id, or by tag prefix (a multi-branch request's
        branches are tagged ``<tag>.b<i>``: one query reads them all, each with its tag)."""
        out = {}
        for req_id, entry in list(self.entries.items()):  # a snapshot: records may land meanwhile
            if (tag is not None and entry.tag == tag) or (req_ids and req_id in req_ids) or (
                    tag_prefix and entry.tag and entry.tag.startswith(tag_prefix)):
                out[req_id] = {"values": entry.latest, "first": entry.first,
                               "probe_runs": entry.steps, "tag": entry.tag}
                if self.keep_history:
                    out[req_id]["history"] = list(entry.history)
        return out


class CaptureLog:
    """Capture mode: per request, the hidden rows of the captured layers at every step, in
    order (row 0 = last prompt token at the end of prefill, row j = decode step j)."""

    def __init__(self, layers) -> None:
        self.layers = tuple(layers)
        self.rows: dict[str, list] = {}

    def add(self, req_ids: list[str], stacked) -> None:
        for i, req_id in enumerate(req_ids):
            self.rows.setdefault(req_id, []).append(stacked[i])

    def drain(self) -> dict:
        """Rows as raw float16 bytes + shape: RPC results are msgpack-encoded without type
        hints, so tensors would not come back as tensors."""
        import torch

        out = {"layers": list(self.layers), "rows": {}}
        for req_id, rows in self.rows.items():
            t = torch.stack(rows).to(torch.float16).contiguous()
            out["rows"][req_id] = {"shape": list(t.shape), "data": t.numpy().tobytes()}
        self.rows = {}
        return out


def decode_rows(entry: dict):
    import numpy as np
    import torch

    arr = np.frombuffer(entry["data"], dtype=np.float16).reshape(entry["shape"])
    return torch.from_numpy(arr.copy())
