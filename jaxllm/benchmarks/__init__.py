"""Benchmark workloads (run by `jaxllm bench` and scripts/bench_*.py)."""
