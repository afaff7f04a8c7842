"""vllm-ext additions to vLLM's OpenAI server (installed as `vllm_ext.server`)."""
