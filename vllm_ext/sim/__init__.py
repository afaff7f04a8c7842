"""Discrete-event simulator of continuous-batching engine replicas, driven by the same policy
objects as the live scheduler (`vllm_ext.sched.policy`)."""
