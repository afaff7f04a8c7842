"""Embedded testbed: a locally built tokenizer, the tiny MoE model and the synthetic task suite."""
