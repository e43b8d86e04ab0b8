"""`make bench`: run every benchmark module and write one report, bench/results.json and bench/results.md.

Each benchmark module exposes `run(out: dict) -> None`, adding entries
`{"value": float, "unit": str, "target": str, "method": str}` under the report's fixed keys. Figures are
only ever written by this command; a benchmark that fails is reported as such and makes the exit non-zero.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

MODULES = (
    "bench.bench_trainer",
    "bench.bench_eval",
    "bench.bench_hf_peer",
    "bench.bench_workflow",
    "bench.bench_list",
    "bench.bench_kubernetes",
    "bench.bench_kubernetes_replicas",
    "bench.bench_containers",
    "bench.bench_ha",
    "bench.bench_fencing",
    "bench.bench_ddp",
    "bench.bench_sweep",
)
KEYS = (
    "checkpoint_write_vs_disk",
    "checkpoint_restore_vs_disk",
    "checkpoint_stall_fraction",
    "throughput_with_vs_without_checkpointing",
    "orchestration_overhead_ratio",
    "recovery_latency_s",
    "detection_latency_s",
    "snapshot_1m_rows_s",
    "resnapshot_s",
    "controller_concurrent_runs",
    "controller_peak_rss_mb",
    "controller_api_requests_per_run_min",
    "detection_latency_s_2_replicas",
    "controller_concurrent_runs_2_replicas",
    "controller_peak_rss_mb_2_replicas",
    "controller_api_requests_per_run_min_2_replicas",
    "steps_lost_per_sigterm",
    "container_leg_overhead",
    "image_size_mb_controller",
    "image_size_mb_trainer",
    "samples_per_s_vs_hf_best",
    "accuracy_vs_hf_best",
    "relay_list_s_500_runs",
    "eval_overhead_fraction",
    "sweep_overhead_ratio",
    "controller_failover_s",
    "upgrade_runs_disrupted",
    "temporal_outage_60s_ok",
    "node_lost_detection_s",
    "ddp_checkpoint_stall_fraction",
    "ddp_steps_lost_per_sigterm",
    "ddp_resume_world_size_change_max_abs_diff",
)


def machine_description() -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def render_markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        "# Relay benchmark report",
        "",
        f"- date: {report['date']}",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"Python {machine['python']}",
        f"- command: `make bench` (last invocation {report['duration_s']:.0f} s; each figure: its module and time)",
        "",
        "| figure | value | unit | target | method |",
        "|---|---|---|---|---|",
    ]
    for key in KEYS:
        entry = report["results"].get(key)
        if entry is None:
            lines.append(f"| {key} | not measured | | | {report['errors'].get(key, 'no benchmark produced it')} |")
            continue
        value = entry["value"]
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        method = f"{entry['method']} ({entry.get('module', '?')}, {entry.get('measured_at', '?')})"
        lines.append(f"| {key} | {shown} | {entry['unit']} | {entry['target']} | {method} |")
    for module, error in report["module_errors"].items():
        lines += ["", f"**{module} failed:** `{error}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench", help="folder for results.json and results.md")
    parser.add_argument("--only", action="append", help="run only these modules (e.g. bench.bench_trainer)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    out = Path(args.out)
    results: dict[str, Any] = {}
    module_errors: dict[str, str] = {}
    if args.only and (out / "results.json").is_file():
        # A partial rerun keeps the other modules' figures (each entry carries its own method and date).
        previous = json.loads((out / "results.json").read_text())
        results.update(previous.get("results", {}))
        module_errors.update({m: e for m, e in previous.get("module_errors", {}).items() if m not in args.only})
    for name in args.only or MODULES:
        print(f"== {name}", flush=True)
        try:
            module_results: dict[str, Any] = {}
            importlib.import_module(name).run(module_results)
            measured_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            results.update(
                {key: {**entry, "module": name, "measured_at": measured_at} for key, entry in module_results.items()}
            )
        except Exception as exc:  # report the failure, keep the other figures
            traceback.print_exc()
            module_errors[name] = f"{type(exc).__name__}: {exc}"
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "duration_s": time.monotonic() - started,  # of this invocation
        "results": {key: results[key] for key in KEYS if key in results},
        "errors": {key: "not produced" for key in KEYS if key not in results},
        "module_errors": module_errors,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(report))
    print(render_markdown(report))
    return 1 if module_errors else 0


if __name__ == "__main__":
    sys.exit(main())
