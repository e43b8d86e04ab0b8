"""`controller_concurrent_runs_2_replicas`: bench_kubernetes's 500-run level driven by two `relay controller`
replicas with leader election (issue 16), and each replica's peak RSS. The same method as bench_kubernetes (see its
docstring), with REPLICAS = 2 and the 500 level only; `python -m bench.bench_kubernetes_replicas` prints the entries.
"""

from __future__ import annotations

import json
from typing import Any

from bench import bench_kubernetes


def run(out: dict[str, Any]) -> None:
    bench_kubernetes.REPLICAS = 2
    bench_kubernetes.LEVELS = (500,)
    bench_kubernetes.run(out)


if __name__ == "__main__":
    results: dict[str, Any] = {}
    run(results)
    print(json.dumps(results, indent=2))
