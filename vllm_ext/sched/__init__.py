"""Predictive scheduling: pure policies (`policy.py`) and the vLLM adapter (`scheduler.py`)."""
