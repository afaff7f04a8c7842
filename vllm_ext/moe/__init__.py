"""LASER load-aware MoE routing for vLLM: the rule (`laser`), the per-layer state attached to
vLLM's routers (`router`), the patch that attaches it (`patch`) and load statistics
(`load_stats`). See docs/laser.md."""
