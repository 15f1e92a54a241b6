"""The servers the benchmark compares, one module per peer.

Each Python peer module is runnable as ``python -m benchmarks.peers.<name>``,
binds 127.0.0.1, prints ``{"port": N}`` when it accepts connections, and runs
until its process group gets SIGTERM.  duprep itself runs through its own CLI
(see :mod:`benchmarks.peers.duprep_peer`), the C echo server through
:mod:`benchmarks.cbuild`.  :mod:`benchmarks.peers.registry` describes how the
harness drives each of them.
"""
