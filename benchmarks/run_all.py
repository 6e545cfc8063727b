"""Run every benchmark, one after another on a quiet machine, and redraw the plots.

Each benchmark runs in its own process with the machine to itself: before each one the script waits
(up to ``--wait`` seconds) for the 1-minute load average to fall below ``--quiet-load``, and records
the load average before and after it. The record (commands, times, load averages, exit codes) goes to
``results/run_all.json``; the plots (step time per method, time to the first step cold and warm) to
``results/plots/``. ``--plots-only`` redraws the plots from the results already on disk. ``--quick``
(tiny models, a few minutes) checks that every benchmark and plot still runs; it writes to a scratch
folder (``--out``), never over the published results.

    python benchmarks/run_all.py                  # everything (several hours on a 2-core CPU)
    python benchmarks/run_all.py --only lora,profile
    python benchmarks/run_all.py --quick          # smoke run into a temporary folder
    python benchmarks/run_all.py --plots-only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PY = sys.executable

# name -> command (run from the repository root); the order is the order of the run
BENCHMARKS: dict[str, list[str]] = {
    "lora": [PY, "benchmarks/bench_lora.py"],
    "profile": [PY, "benchmarks/profile_step.py"],
    "methods": [PY, "benchmarks/bench_methods.py"],
    "compose": [PY, "benchmarks/bench_compose.py"],
    "generate": [PY, "benchmarks/bench_generate.py"],
    "checkpointing": [PY, "benchmarks/bench_checkpointing.py"],
}


def wait_quiet(limit: float, wait: float) -> tuple[float, float]:
    """Wait until the 1-minute load average is below ``limit`` (at most ``wait`` s); (waited, load)."""
    t0 = time.monotonic()
    while os.getloadavg()[0] >= limit and time.monotonic() - t0 < wait:
        time.sleep(5)
    return time.monotonic() - t0, os.getloadavg()[0]


def command(name: str, quick: bool, out: Path) -> list[str]:
    """The command line of benchmark ``name`` writing into ``out`` (small sizes with ``quick``)."""
    if name == "checkpointing":
        small = ["--batch", "2", "--length", "64", "--steps", "1"] if quick else []
        return BENCHMARKS[name] + small + ["--out", str(out / "bench_checkpointing.json")]
    if name == "profile":
        small = ["--models", "llama", "--steps", "1", "--warmup", "1"] if quick else []
        return BENCHMARKS[name] + small + ["--out", str(out)]
    return BENCHMARKS[name] + (["--quick"] if quick else []) + ["--out", str(out)]


def run(names: list[str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    record: dict[str, Any] = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "runs": {}}
    for name in names:
        waited, load = wait_quiet(args.quiet_load, args.wait)
        cmd = command(name, args.quick, out)
        print(
            f"[run_all] {name}: {' '.join(cmd[1:])} (load {load:.2f} after waiting {waited:.0f} s)",
            flush=True,
        )
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=HERE.parent)
        record["runs"][name] = {
            "command": cmd[1:],
            "exit_code": proc.returncode,
            "seconds": time.perf_counter() - t0,
            "waited_for_quiet_s": waited,
            "load_before": load,
            "load_after": os.getloadavg()[0],
        }
    record["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    return record


def _plot_methods(plt: Any, out: Path, path: Path, name: str) -> Path | None:
    if not path.exists():
        return None
    run = json.loads(path.read_text())
    methods = run["methods"]
    names = [m for m, r in methods.items() if r.get("variants")]
    series = {"fx_compiled": "fxadapt compiled", "fx_eager": "fxadapt eager", "peft_eager": "PEFT eager"}
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series.items()):
        xs, ys = [], []
        for j, m in enumerate(names):
            v = methods[m]["variants"].get(key)
            if v and v.get("ratio_vs_floor"):
                xs.append(j + i * width)
                ys.append(v["ratio_vs_floor"])
        if ys:
            ax.bar(xs, ys, width=width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width for j in range(len(names))], names, rotation=45, ha="right")
    ax.set_ylim(0.8, max(1.5, ax.get_ylim()[1]))
    ax.set_ylabel("training step / frozen floor")
    ax.set_title(f"BERT-base training step per method (batch 8 x 128), {run['machine']['date'][:10]}")
    ax.legend()
    fig.tight_layout()
    target = out / name
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def _plot_startup(plt: Any, out: Path, results: Path) -> Path | None:
    path = results / "bench_lora.json"
    if not path.exists():
        return None
    models = json.loads(path.read_text())["models"]
    runs = [
        ("fx_compiled", "fxadapt regional"),
        ("fx_whole", "fxadapt whole graph"),
        ("peft_compiled", "PEFT + torch.compile"),
    ]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, (name, sections) in zip(axes[0], models.items()):
        startup = sections.get("startup", {})
        labels, cold, warm = [], [], []
        for key, label in runs:
            c, w = startup.get(f"{key}_cold", {}), startup.get(f"{key}_warm", {})
            if "time_to_first_step_s" in c:
                labels.append(label)
                cold.append(c["time_to_first_step_s"])
                warm.append(w.get("time_to_first_step_s", 0.0))
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], cold, width=0.4, label="cold")
        ax.bar([x + 0.2 for x in xs], warm, width=0.4, label="warm (second process)")
        ax.set_xticks(list(xs), labels, rotation=15)
        ax.set_ylabel("seconds to the end of the first training step")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    target = out / "compile_time.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def plots(results: Path = RESULTS) -> list[Path]:
    """Draw every plot from the results in ``results`` into ``results/plots``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = results / "plots"
    out.mkdir(parents=True, exist_ok=True)
    made = [
        _plot_methods(plt, out, results / "bench_methods.json", "step_time_per_method.png"),
        # the 2026-12-02 run with regional compilation (bench_methods.py --out results/methods_regional)
        _plot_methods(
            plt, out, results / "methods_regional" / "bench_methods.json", "step_time_per_method_regional.png"
        ),
        # the same with compile=True compiling the whole graph on CPU (--out results/methods_whole)
        _plot_methods(
            plt, out, results / "methods_whole" / "bench_methods.json", "step_time_per_method_whole.png"
        ),
        _plot_startup(plt, out, results),
    ]
    return [p for p in made if p is not None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {', '.join(BENCHMARKS)}"
    )
    p.add_argument("--quick", action="store_true", help="pass --quick to each benchmark (a smoke run)")
    p.add_argument("--quiet-load", type=float, default=0.5, help="1-minute load average counted as quiet")
    p.add_argument(
        "--wait", type=float, default=600, help="longest wait for a quiet machine per benchmark (s)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default benchmarks/results; with --quick a new temporary folder)",
    )
    p.add_argument("--plots-only", action="store_true")
    args = p.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="fxadapt-run-all-quick-")) if args.quick else RESULTS)
    failed = 0
    if not args.plots_only:
        names = [n for n in args.only.split(",") if n]
        unknown = sorted(set(names) - set(BENCHMARKS))
        if unknown:
            p.error(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
        out.mkdir(parents=True, exist_ok=True)
        record = run(names, args, out)
        (out / "run_all.json").write_text(json.dumps(record, indent=1))
        failed = sum(1 for r in record["runs"].values() if r["exit_code"] != 0)
        for name, r in record["runs"].items():
            print(f"[run_all] {name}: exit {r['exit_code']} after {r['seconds']:.0f} s")
    for path in plots(out):
        print(f"[run_all] plot: {path}")
    print(f"[run_all] results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
