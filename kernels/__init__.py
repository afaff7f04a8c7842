"""HACK (arXiv 2502.03589): attention computed on quantized KV (installed as `vllm_ext.kernels`).

quant.py          the format: K per channel over Π tokens, V per token, packed partition records
kv_store.py       paged cache: records in vLLM's pages, 16-bit open partition and sinks, write plan
reference.py      torch attention on the cache (homomorphic products, the oracle) + baselines
cpu_kernel.py     JIT build/loader of csrc/ (fused C++ CPU attention + in-place writes), fallback
hack_attention.py the Triton kernel (decode and prefill, int8 dots on codes)
engine.py         vLLM glue shared by cpu_backend.py (C++ kernel) and gpu_backend.py (Triton)
select.py         lazy backend choice: HACK for --ext-kv-bits 8/4/2, stock vLLM for 16
"""
