"""Benchmark comparisons for duprep (GitHub issue #4).

Run ``python -m benchmarks --help`` or ``tools/bench --help``; README.md in
this directory explains the peers, the load and how to read the results.
Nothing here is imported by ``duprep`` itself.
"""
