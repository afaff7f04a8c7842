"""Benchmark harness: workloads and arrivals, an open-loop load generator, comparisons."""
