"""Triton kernels for attention on quantized KV (installed as `vllm_ext.kernels`)."""
