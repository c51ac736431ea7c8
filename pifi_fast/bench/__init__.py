"""Benchmarks of pifi_fast against the reference and the Hugging Face layer (GUIDE §4).

    timing     medians and spreads (CUDA events on GPU), measured ceilings, saved bytes
    workloads  W1-W4 and their baselines, as cases that build and time themselves
    report     table, JSON, Markdown, PNG plots, and --compare against an earlier run
Used by `pifi-fast bench` and by the pytest-benchmark suite in benchmarks/.
"""
