"""Probe models over the served model's hidden states (installed as `vllm_ext.probes`)."""
