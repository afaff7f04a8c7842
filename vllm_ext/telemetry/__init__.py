"""Telemetry in small memory (issue 18, docs/telemetry.md).

* `sketch`: Count-Min and Count Sketch with power-of-two widths (exact folding) and bounds;
* `fragments`: DiSketch (arXiv 2503.13515) - fragments per sub-epoch, sized by a memory
  budget, closed at equal load per counter (error equalisation), merged over a time range and
  across replicas at query time;
* `wcss` + `learned`: Window Compact Space Saving and its learned variant LWCSS
  (arXiv 2409.11516) - a hashed-feature next-arrival classifier filters items unlikely to
  recur within the window, behind a two-frame Bloom guard;
* `collect`: what feeds them (prefix-block hashes in the scheduler, MoE expert load and
  tenants in the API server); `engine`: the scheduler side and the hot-prefix hint;
* `hub`, `export`, `tenants`, `cli`: payload, ``/metrics`` families, ``GET /v1/ext/telemetry``,
  the tenant middleware and ``vllm-ext telemetry merge``.
Pure: no vLLM import outside `engine`'s duck-typed scheduler access and `hub`'s RPC calls.
"""
