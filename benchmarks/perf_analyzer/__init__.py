"""perf_analyzer benchmarks (see README.md here)."""
