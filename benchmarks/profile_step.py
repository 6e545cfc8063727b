"""Where a LoRA training step spends its time: eager against compiled, kernel by kernel.

For BERT-base and Llama 4L/512 (``bench_lora.py``'s models, batch and LoRA), one training step of
fxadapt eager, fxadapt compiled by region and fxadapt compiled whole (``fx_compiled``, what
``compile=True`` picks for the device, can be asked for too) is profiled with
``torch.profiler`` after warm-up; inductor's generated kernels are made visible to the profiler
(``cpp.enable_kernel_profile``). Every op's self time is put in a category (GEMMs, attention, layer
norm, softmax, activation, dropout, other pointwise, optimizer, ...) and in the phase it ran in:
forward, backward or optimizer step. What the phase's wall time has beyond its ops' time is Python,
dispatch and guard overhead. Compiled backward kernels named after forward ops are what the AOT
partitioner recomputes instead of saving. Writes ``profile_step.json`` and ``profile_step.md``.

    python benchmarks/profile_step.py                 # both models, 3 profiled steps each
    python benchmarks/profile_step.py --models bert --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_lora as bl  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402
from tqdm import tqdm  # noqa: E402

VARIANTS = {"fx_eager": False, "fx_regional": "regional", "fx_whole": "whole", "fx_compiled": True}
DEFAULT_VARIANTS = "fx_eager,fx_regional,fx_whole"
PHASES = ("forward", "backward", "optimizer")
# first match wins; patterns are searched in lower-cased op or kernel names
CATEGORIES = (
    ("optimizer", r"adamw|_foreach|optimizer"),
    ("attention (SDPA)", r"scaled_dot_product|flash_attention|_efficient_attention"),
    ("GEMM", r"addmm|\bmm\b|aten::mm|bmm|matmul|linear|mkldnn|cpp_fused.*_mm_|extern_kernels"),
    ("layer norm / RMS norm", r"layer_norm|rsqrt|_rms|var_mean"),
    ("softmax", r"softmax|_log_softmax|amax"),
    ("GELU / SiLU", r"gelu|silu|erf|sigmoid"),
    ("dropout (RNG)", r"bernoulli|dropout|rand|philox|seed"),
    ("loss", r"nll_loss|cross_entropy"),
    ("embedding", r"embedding"),
    (
        "copies / views",
        r"copy_|clone|contiguous|_to_copy|cat|view|reshape|permute|transpose|expand|slice|select|as_strided|t\b",
    ),
    ("fill / zero", r"fill_|zero_|zeros|empty"),
    ("other pointwise", r"add|mul|div|sub|pow|neg|tanh|where|masked|sum|mean|cpp_fused"),
)
FORWARD_OPS = re.compile(
    r"gelu(?!_backward)|silu(?!_backward)|native_layer_norm(?!_backward)|_softmax(?!_backward)|erf"
)


def category(name: str) -> str:
    low = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, low):
            return label
    return "other"


def _intervals(prof: Any) -> dict[str, list[tuple[float, float]]]:
    spans: dict[str, list[tuple[float, float]]] = {p: [] for p in PHASES}
    for e in prof.events():
        if e.name in spans:
            spans[e.name].append((e.time_range.start, e.time_range.end))
    return spans


def _phase_of(t: float, spans: dict[str, list[tuple[float, float]]]) -> str | None:
    for phase, ranges in spans.items():
        if any(a <= t <= b for a, b in ranges):
            return phase
    return None


def analyse(prof: Any, steps: int) -> dict[str, Any]:
    """Per phase: wall time, op self time by category, and the overhead beyond the ops (ms per step)."""
    spans = _intervals(prof)
    out: dict[str, Any] = {}
    for phase in PHASES:
        out[phase] = {
            "wall_ms": sum(b - a for a, b in spans[phase]) / 1000 / steps,
            "ops_ms": {},
            "recompute_ms": 0.0,
        }
    for e in prof.events():
        if e.name in PHASES or e.name.startswith(
            ("ProfilerStep", "## ", "Torch-Compiled Region", "CompiledFunction")
        ):
            continue
        phase = _phase_of(e.time_range.start, spans)
        if phase is None or e.self_cpu_time_total <= 0:
            continue
        ms = e.self_cpu_time_total / 1000 / steps
        cat = category(e.name)
        ops = out[phase]["ops_ms"]
        ops[cat] = ops.get(cat, 0.0) + ms
        if phase == "backward" and e.name.startswith("cpp_fused") and FORWARD_OPS.search(e.name):
            out[phase]["recompute_ms"] += ms
    for phase in PHASES:
        total = sum(out[phase]["ops_ms"].values())
        out[phase]["ops_total_ms"] = total
        out[phase]["overhead_ms"] = out[phase]["wall_ms"] - total
    return out


def make_step(variant: str, name: str, method: str) -> tuple[Any, Any]:
    import fxadapt

    spec = bl.model_spec(name, False)
    base = bl.build_base(name, False)
    batch = bl.make_batch(spec, base, torch.device("cpu"))
    config = bl.fx_config() if method == "lora" else method
    model = fxadapt.adapt(base, config, compile=VARIANTS[variant])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with record_function("forward"):
            loss = model(**batch).loss
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, model


def run(name: str, variant: str, steps: int, warmup: int, method: str) -> dict[str, Any]:
    step, _ = make_step(variant, name, method)
    for _ in range(warmup):
        step()
    walls = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            t = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t)
    res = analyse(prof, steps)
    res["step_ms"] = 1000 * statistics.median(walls)
    torch._dynamo.reset()
    return res


def markdown(results: dict[str, Any]) -> str:
    m, method = results["machine"], results["args"].get("method", "lora")
    lines = [
        f"# Training step profile: {method} ({m['torch']}, {m['threads']} threads, load {m['load_start'][0]:.2f})",
        "",
        "Self time of the ops (ms per step) under torch.profiler, by category and phase. Inductor's kernels",
        "are fused: each counts in the first category its name matches (layer norm, then softmax, ...).",
        "The profiler's own cost per op inflates eager (thousands of small ops) far more than compiled.",
        "",
    ]
    for name, by_variant in results["models"].items():
        lines += [f"## {bl.MODEL_TITLES.get(name, name)}", ""]
        variants = list(by_variant)
        head = "| Category | " + " | ".join(f"{v} fwd | {v} bwd" for v in variants) + " |"
        lines += [head, "|---|" + "---:|" * (2 * len(variants))]
        cats = [c for c, _ in CATEGORIES] + ["other"]
        for cat in cats:
            cells = []
            for v in variants:
                for phase in ("forward", "backward"):
                    cells.append(f"{by_variant[v][phase]['ops_ms'].get(cat, 0.0):.0f}")
            if any(c != "0" for c in cells):
                lines.append(f"| {cat} | " + " | ".join(cells) + " |")
        for label, key in (
            ("ops total", "ops_total_ms"),
            ("Python / dispatch / guards", "overhead_ms"),
            ("phase wall", "wall_ms"),
        ):
            cells = [f"{by_variant[v][p][key]:.0f}" for v in variants for p in ("forward", "backward")]
            lines.append(f"| **{label}** | " + " | ".join(cells) + " |")
        rec = [f"{by_variant[v]['backward']['recompute_ms']:.0f}" for v in variants]
        lines.append("| recomputed forward ops in backward | " + " | ".join(f"— | {r}" for r in rec) + " |")
        lines.append("")
        lines.append(
            "Optimizer step (ms): "
            + ", ".join(f"{v} {by_variant[v]['optimizer']['wall_ms']:.0f}" for v in variants)
            + ". Whole step, median (ms, profiler on): "
            + ", ".join(f"{v} {by_variant[v]['step_ms']:.0f}" for v in variants)
            + "."
        )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="bert,llama")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"any of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--report", metavar="JSON", help="only rewrite the markdown from a results JSON")
    p.add_argument(
        "--method",
        default="lora",
        help="lora (bench_lora.py's LoRA) or an fxadapt method name with its defaults, e.g. prefix_tuning",
    )
    args = p.parse_args(argv)
    if args.report:
        report = Path(args.report)
        report.with_suffix(".md").write_text(markdown(json.loads(report.read_text())))
        return 0
    bl.set_threads()
    torch._inductor.config.cpp.enable_kernel_profile = True
    results: dict[str, Any] = {
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_start": os.getloadavg(),
        },
        "args": vars(args),
        "models": {},
    }
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    jobs = [(m, v) for m in args.models.split(",") for v in args.variants.split(",")]
    for name, variant in tqdm(jobs, desc="profiling", unit="variant"):
        results["models"].setdefault(name, {})[variant] = run(
            name, variant, args.steps, args.warmup, args.method
        )
    results["machine"]["load_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "profile_step" if args.method == "lora" else f"profile_step_{args.method}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
