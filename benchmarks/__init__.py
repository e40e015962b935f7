"""Benchmark harness: the proxy against nginx `proxy_pass` and the origin itself.

`python -m benchmarks run [options]` starts an origin (nginx, or a built-in asyncio file server),
the proxy in each mode and worker count, nginx as the reference proxy, and drives each of them
with wrk (or a bundled asyncio load generator), interleaved, pinned to CPUs; it then prints a
table and writes JSON and an SVG chart under `benchmarks/results/`. See `__main__.py` for options.
"""

from __future__ import annotations
