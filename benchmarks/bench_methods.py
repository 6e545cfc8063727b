"""Training-step benchmark, one row per adapter method: fxadapt (compiled and eager), PEFT, the floor.

For each method (AdapterHub's default config for its name) on a BERT-base-sized classifier (random
init, batch 8, seq 128), one training step (forward, loss, backward, AdamW step on the trainable
parameters) of: fxadapt compiled (``fxadapt.adapt(model, name, compile=True)``), fxadapt eager
(``compile=False``), PEFT eager where PEFT has the method with an equivalent config, and the floor of
``bench_lora.py`` (the plain model, every weight frozen, forward + backward from ``inputs_embeds`` that
require grad), plus the same floor under ``torch.compile``. Per method, its variants and the floors are
warmed up (compiling included), then timed round-robin; the figure is the median, the ratio is to the
floor of the same interleaving.

Run ``python benchmarks/bench_methods.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):  # run from a checkout without installing; bench_lora sits beside us
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from bench_lora import (  # noqa: E402
    UNDISTURBED,
    Spec,
    _ms,
    _x,
    machine_info,
    make_batch,
    make_train_step,
    pick_device,
    set_threads,
    summarize,
    sync,
)
from tqdm import tqdm  # noqa: E402

METHODS = (
    "lora",
    "ia3",
    "seq_bn",
    "double_seq_bn",
    "par_bn",
    "scaled_par_bn",
    "adapter_plus",
    "compacter",
    "compacter++",
    "seq_bn_inv",
    "prefix_tuning",
    "prompt_tuning",
    "loreft",
    "noreft",
    "direft",
    "mam",
    "unipelt",
)
VARIANTS = ("fx_compiled", "fx_eager", "peft_eager", "peft_eager_alt", "floor", "floor_compiled")
LABELS = {
    "fx_compiled": "fxadapt compiled",
    "fx_eager": "fxadapt eager",
    "peft_eager": "PEFT eager (equivalent config)",
    "peft_eager_alt": "PEFT eager (alternative config, see notes)",
    "floor": "floor (plain model, frozen, eager)",
    "floor_compiled": "floor compiled (plain model, frozen, torch.compile)",
}
TARGET = 1.02  # every method's training step <= 1.02x the floor
# AdapterHub's own figures, measured on this machine (reported in the issue, not by this script).
ADAPTERHUB_REFERENCE = {
    "source": "AdapterHub (adapters library), measured on this machine; figures from the issue",
    "floor_ms": 1962.0,
    "methods": {
        "seq_bn": {"ms": 1951.0, "ratio_vs_floor": 1951.0 / 1962.0},
        "prefix_tuning": {"ms": 2081.0, "ratio_vs_floor": 2081.0 / 1962.0},
    },
}
LR = 1e-4


# ---- model and batch -----------------------------------------------------------------------------
def bert_config(quick: bool):
    from transformers import BertConfig

    if not quick:
        return BertConfig()  # hidden 768, 12 layers, 12 heads, intermediate 3072
    # hidden 128: Compacter's phm_dim=4 must divide hidden // 32
    return BertConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        vocab_size=1000,
    )


def build_base(quick: bool) -> torch.nn.Module:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(bert_config(quick))


def spec(quick: bool) -> Spec:
    return Spec("bert", 2 if quick else 8, 32 if quick else 128, ["query", "value"], {})


def n_trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---- PEFT configs --------------------------------------------------------------------------------
NO_PEFT = {
    "seq_bn": "PEFT has no bottleneck adapter",
    "double_seq_bn": "PEFT has no bottleneck adapter",
    "par_bn": "PEFT has no bottleneck adapter",
    "scaled_par_bn": "PEFT has no bottleneck adapter",
    "adapter_plus": "PEFT has no bottleneck adapter",
    "compacter": "PEFT has no Compacter (PHM bottleneck adapter)",
    "compacter++": "PEFT has no Compacter (PHM bottleneck adapter)",
    "seq_bn_inv": "PEFT has neither bottleneck nor invertible adapters",
    "loreft": "PEFT has no ReFT (that is the separate pyreft library)",
    "noreft": "PEFT has no ReFT (that is the separate pyreft library)",
    "direft": "PEFT has no ReFT (that is the separate pyreft library)",
    "mam": "PEFT has no Mix-and-Match union (prefix tuning + parallel bottleneck)",
    "unipelt": "PEFT has no UniPELT union (LoRA + prefix tuning + bottleneck, gated)",
}


def peft_configs(method: str) -> dict[str, tuple[Any, str]]:
    """{variant: (PEFT config, what it is and how it differs from AdapterHub's default)}."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    if method == "lora":
        return {
            "peft_eager": (
                LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"]),
                "LoraConfig(r=8, lora_alpha=8, lora_dropout=0, target_modules=[query, value]): same as "
                "AdapterHub's LoRAConfig default (r=8, alpha=8, q and v, no dropout, B zero at init).",
            )
        }
    if method == "ia3":
        return {
            "peft_eager": (
                IA3Config(target_modules=["key", "value", "intermediate.dense"], feedforward_modules=[]),
                "IA3Config(target_modules=[key, value, intermediate.dense], feedforward_modules=[]): "
                "every vector scales its projection's output, bias included, as AdapterHub's IA3Config "
                "(k, v and the intermediate projection, composition 'scale'); same 3 x 12 vectors.",
            ),
            "peft_eager_alt": (
                IA3Config(
                    target_modules=["key", "value", "intermediate.dense"],
                    feedforward_modules=["intermediate.dense"],
                ),
                "IA3Config(..., feedforward_modules=[intermediate.dense]): PEFT then scales the 768-wide "
                "*input* of intermediate.dense instead of its 3072-wide output, a different model from "
                "AdapterHub's (fewer parameters); timed for reference only.",
            ),
        }
    if method == "prefix_tuning":
        return {
            "peft_eager": (
                PrefixTuningConfig(
                    task_type="SEQ_CLS",
                    num_virtual_tokens=30,
                    prefix_projection=True,
                    encoder_hidden_size=512,
                ),
                "PrefixTuningConfig(num_virtual_tokens=30, prefix_projection=True, "
                "encoder_hidden_size=512): AdapterHub reparameterizes by default (flat=False: "
                "embedding [30, 768] -> Linear(768, 512) -> tanh -> Linear(512, 12*2*768)) and so "
                "does this; PEFT's own default is prefix_projection=False (no MLP, AdapterHub's "
                "flat=True). PEFT runs the MLP once per batch row (on [B, 30] token ids), AdapterHub "
                "and fxadapt once per step, then expand.",
            ),
            "peft_eager_alt": (
                PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=30),
                "PrefixTuningConfig(num_virtual_tokens=30) with PEFT's default prefix_projection=False: "
                "the keys and values are trained directly, like fxadapt's prefix_tuning_flat, not "
                "AdapterHub's default; timed for reference only.",
            ),
        }
    if method == "prompt_tuning":
        return {
            "peft_eager": (
                PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=10),
                "PromptTuningConfig(num_virtual_tokens=10): 10 prompt vectors in front of the tokens, "
                "as AdapterHub's prompt_length=10. Differences: PEFT prepends them to the word "
                "embeddings, so they also get position embeddings, the embedding LayerNorm and "
                "dropout (AdapterHub inserts them after the embedding block); PEFT initialises "
                "normal(0, 1), AdapterHub uniform(+-0.5). Same sequence length (138) either way.",
            )
        }
    return {}


# ---- variants ------------------------------------------------------------------------------------
def _optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    # weight_decay=0: AdamW's decoupled decay would zero LoReFT's orthogonal projection (docs/methods.md)
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.0)


def make_fx_step(
    method: str, model: torch.nn.Module, batch: dict[str, Any], compiled: bool
) -> Callable[[], None]:
    import fxadapt

    model.train()
    m = fxadapt.adapt(model, method, compile=compiled)
    return _training_step(m, batch)


def _training_step(module: torch.nn.Module, batch: dict[str, Any]) -> Callable[[], None]:
    """One forward, loss, backward and AdamW step over ``module``'s trainable parameters."""
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = _optimizer(params)

    def step() -> None:
        out = module(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.keep = module  # type: ignore[attr-defined]
    step.n_trainable = sum(p.numel() for p in params)  # type: ignore[attr-defined]
    return step


def make_peft_step(config: Any, model: torch.nn.Module, batch: dict[str, Any]) -> Callable[[], None]:
    from peft import get_peft_model

    model.train()
    pm = get_peft_model(model, config)
    # task_type="SEQ_CLS" makes PEFT train a copy of the classifier (modules_to_save); fxadapt trains
    # the adapter only, so freeze it: both optimise the same parameters.
    for name, p in pm.named_parameters():
        if "modules_to_save" in name:
            p.requires_grad_(False)
    return _training_step(pm, batch)


def _error(exc: BaseException, stage: str) -> dict[str, str]:
    return {
        "stage": stage,
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": traceback.format_exc(),
    }


def warm_up(
    steps: dict[str, Callable[[], None]],
    n: int,
    device: torch.device,
    desc: str,
    errors: dict[str, Any],
) -> dict[str, list[float]]:
    """``n`` steps of each variant (the first of a compiled one compiles); a variant that fails is dropped."""
    times: dict[str, list[float]] = {}
    for k in tqdm(list(steps), desc=f"{desc} warm-up", unit="variant", leave=False):
        times[k] = []
        try:
            for _ in range(n):
                sync(device)
                t0 = time.perf_counter()
                steps[k]()
                sync(device)
                times[k].append(time.perf_counter() - t0)
        except Exception as exc:  # report it and go on with the others
            errors[k] = _error(exc, "warm-up")
            tqdm.write(f"  {desc} {k}: FAILED in warm-up: {errors[k]['error']}")
            del steps[k]
            gc.collect()
    return times


def _busy_jiffies() -> tuple[int, int] | None:
    """(non-idle jiffies of the whole machine, jiffies per second) from ``/proc/stat``; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, os.sysconf("SC_CLK_TCK")


def other_load(window: float = 1.0) -> float | None:
    """Cores' worth of CPU that other processes used during ``window`` seconds (this one idles meanwhile)."""
    a = _busy_jiffies()
    if a is None:
        return None
    t0, own0 = time.perf_counter(), sum(os.times()[:2])
    time.sleep(window)
    b = _busy_jiffies()
    own = sum(os.times()[:2]) - own0
    return max(0.0, (b[0] - a[0]) / a[1] - own) / (time.perf_counter() - t0)


def wait_quiet(limit: float, threshold: float = 0.25) -> tuple[float, float | None]:
    """Wait (up to ``limit`` s) until other processes use less than ``threshold`` of a core over 1 s.

    Returns (seconds waited, the last load seen). A step still gets disturbed if a process starts during it;
    the "undisturbed" medians catch those.
    """
    t0 = time.perf_counter()
    load = None
    while limit > 0:
        load = other_load()
        if load is None or load < threshold or time.perf_counter() - t0 >= limit:
            break
        time.sleep(1.0)
    return time.perf_counter() - t0, load


def _n_undisturbed(raw: list[float], cpu: list[float]) -> int:
    return summarize(raw, cpu).get("n_undisturbed", len(raw))


def timed_rounds(
    steps: dict[str, Callable[[], None]], args: argparse.Namespace, device: torch.device, desc: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``args.steps`` rounds of every variant (A B C A B C ...), then, on CPU, more rounds while a variant
    has fewer than ``args.min_undisturbed`` undisturbed steps, up to ``args.max_steps`` rounds in all.
    On CPU each round first waits (up to ``args.wait_quiet`` s) for other processes to leave the cores."""
    raw: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}  # process CPU time (all threads) per step
    on_cpu = device.type == "cpu"
    bar = tqdm(desc=f"{desc} timed", unit="round", total=args.steps, leave=False)
    rounds = 0
    waits: list[dict[str, Any]] = []
    while rounds < args.steps or (
        on_cpu
        and rounds < args.max_steps
        and any(_n_undisturbed(raw[k], cpu[k]) < args.min_undisturbed for k in steps)
    ):
        if rounds >= args.steps:
            bar.total = args.max_steps
        if on_cpu and args.wait_quiet > 0:
            bar.set_postfix_str("waiting for a quiet machine")
            waited, load = wait_quiet(args.wait_quiet)
            bar.set_postfix_str("")
            waits.append({"waited_s": waited, "other_load_cores": load})
        for k, fn in steps.items():
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            sync(device)
            raw[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
        rounds += 1
        bar.update()
    bar.close()
    out = {k: {"raw_s": raw[k], "cpu_s": cpu[k] if on_cpu else None} for k in steps}
    return out, waits


def run_method(
    method: str,
    base: torch.nn.Module,
    batch: dict[str, Any],
    floors: dict[str, Callable[[], None]],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """Build the method's variants, time them interleaved with the floors, free them."""
    res: dict[str, Any] = {"errors": {}, "trainable": {}, "peft_notes": {}}
    if method in NO_PEFT:
        res["peft_notes"]["peft_eager"] = NO_PEFT[method]
    builders: dict[str, Callable[[], Callable[[], None]]] = {}
    if "fx_compiled" in args.variants:
        builders["fx_compiled"] = lambda: make_fx_step(method, copy.deepcopy(base), batch, True)
    if "fx_eager" in args.variants:
        builders["fx_eager"] = lambda: make_fx_step(method, copy.deepcopy(base), batch, False)
    if "peft_eager" in args.variants:
        for variant, (cfg, note) in peft_configs(method).items():
            res["peft_notes"][variant] = note
            builders[variant] = lambda cfg=cfg: make_peft_step(cfg, copy.deepcopy(base), batch)
    steps: dict[str, Callable[[], None]] = {}
    t0 = time.perf_counter()
    for kind, build in builders.items():
        try:
            steps[kind] = build()
            res["trainable"][kind] = steps[kind].n_trainable  # type: ignore[attr-defined]
        except Exception as exc:  # report it and go on
            res["errors"][kind] = _error(exc, "build")
            tqdm.write(f"  {method} {kind}: FAILED to build: {res['errors'][kind]['error']}")
    res["build_s"] = time.perf_counter() - t0
    steps.update(floors)
    t0 = time.perf_counter()
    warm = warm_up(steps, args.warmup, device, method, res["errors"])
    res["warmup_phase_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    timed, res["quiet_waits"] = timed_rounds(steps, args, device, method)
    res["timed_phase_s"] = time.perf_counter() - t0
    for k, v in timed.items():
        v["warmup_s"] = warm.get(k, [])
    res["variants"] = timed
    for k in [k for k in steps if k not in floors]:
        del steps[k]
    del steps, builders
    gc.collect()
    return res


def build_floors(
    base: torch.nn.Module, batch: dict[str, Any], args: argparse.Namespace
) -> dict[str, Callable[[], None]]:
    """The floors, built once and timed again in every method's interleaving."""
    sp = spec(args.quick)
    kinds = ["floor"] + ([] if args.no_floor_compiled else ["floor_compiled"])
    return {k: make_train_step(k, copy.deepcopy(base), sp, batch) for k in kinds}


# ---- derived figures and report ------------------------------------------------------------------
def derive(results: dict[str, Any]) -> None:
    """(Re)compute medians and ratios to the floor from the raw samples, in place."""
    for r in results["methods"].values():
        variants = r.get("variants", {})
        for v in variants.values():
            v.update(summarize(v["raw_s"], v.get("cpu_s")))
        for ref in ("floor", "floor_compiled"):
            floor = variants.get(ref, {})
            for v in variants.values():
                for key, name in (
                    ("median_s", f"ratio_vs_{ref}"),
                    ("median_undisturbed_s", f"ratio_vs_{ref}_undisturbed"),
                ):
                    base = floor.get(key)
                    v[name] = v[key] / base if base and v.get(key) is not None else None


def _cell(r: dict[str, Any], variant: str, undisturbed: bool = False) -> tuple[str, str]:
    v = r.get("variants", {}).get(variant)
    if v is None:
        if variant in r.get("errors", {}):
            return "error", "error"
        return "—", "—"
    if undisturbed:
        n = v.get("n_undisturbed")
        ms = _ms(v.get("median_undisturbed_s")) + (f" (n={n})" if n is not None else "")
        return ms, _x(v.get("ratio_vs_floor_undisturbed"))
    mark = "*" if _disturbed(v) or _disturbed(r["variants"].get("floor")) else ""
    return _ms(v["median_s"]) + mark, _x(v.get("ratio_vs_floor")) + mark


def _x_fc(r: dict[str, Any]) -> str:
    """fxadapt compiled over the compiled floor, undisturbed medians."""
    v = r.get("variants", {}).get("fx_compiled")
    return _x(v and v.get("ratio_vs_floor_compiled_undisturbed"))


def _disturbed(v: dict[str, Any] | None) -> bool:
    """Whether some of the variant's timed steps were disturbed (CPU runs only)."""
    return v is not None and v.get("n_undisturbed") is not None and v["n_undisturbed"] < len(v["raw_s"])


def _params(r: dict[str, Any]) -> str:
    t = r.get("trainable", {})
    fx = t.get("fx_compiled", t.get("fx_eager"))
    return "n/a" if fx is None else f"{fx:,}"


def _rounds(r: dict[str, Any]) -> str:
    floor = r.get("variants", {}).get("floor")
    return "n/a" if floor is None else str(len(floor["raw_s"]))


def markdown(results: dict[str, Any]) -> str:
    info, a = results["machine"], results["args"]
    sh = results["shape"]
    lines = [
        f"# fxadapt training step per method: {info['date']}",
        "",
        f"BERT-base-sized `BertForSequenceClassification` (random init; {sh['config']}), batch {sh['batch']} x "
        f"seq {sh['seq']}. Device {info['device']}, {info['cpu_count']} CPUs, {info['torch_threads']} torch "
        f"threads, torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}; "
        f"{a['warmup']} warm-up steps (compiling included), then {a['steps']} timed rounds"
        + (
            f" (more, up to {a['max_steps']}, while a variant had fewer than {a['min_undisturbed']} "
            "undisturbed steps)"
            if a.get("min_undisturbed") and a.get("max_steps", 0) > a["steps"]
            else ""
        )
        + (
            f" in the first of {len(results['runs'])} merged runs (see the end)"
            if results.get("runs")
            else ""
        )
        + "; medians; "
        f"load average at start {', '.join(f'{x:.2f}' for x in info['loadavg_start'])}"
        + (f", at end {', '.join(f'{x:.2f}' for x in info['loadavg_end'])}" if "loadavg_end" in info else "")
        + (" (--quick: tiny config, the figures mean nothing)" if a["quick"] else "")
        + ".",
        "",
        "One training step = forward, loss, backward, AdamW step on the trainable parameters. Floor = the "
        "plain model with every weight frozen, forward + loss + backward from `inputs_embeds` that require "
        "grad, no optimizer step (as in `bench_lora.py`). Per method, its variants and the floors run "
        "round-robin in one process; ratios are to the floor of that method's interleaving.",
        "",
        "## Training step (ms, median) and ratio to the floor",
        "",
        "| Method | Trainable params | fxadapt compiled ms | x floor | fxadapt eager ms | x floor "
        "| PEFT eager ms | x floor | floor ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    methods = results["methods"]
    for name, r in methods.items():
        c, e, p = _cell(r, "fx_compiled"), _cell(r, "fx_eager"), _cell(r, "peft_eager")
        f = _cell(r, "floor")[0]
        lines.append(f"| {name} | {_params(r)} | {c[0]} | {c[1]} | {e[0]} | {e[1]} | {p[0]} | {p[1]} | {f} |")
    lines += [
        "",
        "\\* some of these steps (or the floor's) were disturbed by another process: see the next table.",
        "",
        f"## Undisturbed steps (CPU/wall >= {UNDISTURBED} x the variant's best), median ms and x floor",
        "",
        "A step during which another process took a core runs with fewer threads and is much slower; "
        "these medians leave such steps out (n = steps kept).",
        "",
        "| Method | rounds | fxadapt compiled | x floor | fxadapt eager | x floor | PEFT eager | x floor "
        "| floor | floor compiled | x floor | fxadapt compiled x floor compiled |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in methods.items():
        c, e, p = (_cell(r, v, True) for v in ("fx_compiled", "fx_eager", "peft_eager"))
        f, fc = _cell(r, "floor", True), _cell(r, "floor_compiled", True)
        lines.append(
            f"| {name} | {_rounds(r)} | {c[0]} | {c[1]} | {e[0]} | {e[1]} | {p[0]} | {p[1]} | {f[0]} | {fc[0]} | {fc[1]} | {_x_fc(r)} |"
        )
    ref = results.get("adapterhub_reference", ADAPTERHUB_REFERENCE)
    lines += [
        "",
        "## AdapterHub reference",
        "",
        f"{ref['source']}: floor {ref['floor_ms']:.0f} ms; "
        + "; ".join(f"{m} {d['ms']:.0f} ms ({d['ratio_vs_floor']:.2f}x)" for m, d in ref["methods"].items())
        + ".",
        "",
        f"## Target: training step <= {TARGET}x the floor",
        "",
        "On CPU the verdict uses the undisturbed medians where the run has them (all steps otherwise).",
        "",
        "| Method | fxadapt compiled | fxadapt eager |",
        "|---|---|---|",
    ]
    for name, r in methods.items():
        cells = []
        for v in ("fx_compiled", "fx_eager"):
            d = r.get("variants", {}).get(v)
            if d is None or d.get("ratio_vs_floor") is None:
                cells.append("n/a")
                continue
            x, u = d["ratio_vs_floor"], d.get("ratio_vs_floor_undisturbed")
            verdict = u if u is not None else x
            cell = f"{'met' if verdict <= TARGET else 'NOT met'} ("
            cell += f"undisturbed {u:.3f}x; all steps {x:.3f}x)" if u is not None else f"{x:.3f}x)"
            cells.append(cell)
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    notes = [(m, v, n) for m, r in methods.items() for v, n in r.get("peft_notes", {}).items()]
    if notes:
        lines += [
            "",
            "## PEFT configs",
            "",
            'With `task_type="SEQ_CLS"` (prefix and prompt tuning need it) PEFT would also train a copy '
            "of the classifier; the script freezes it, so PEFT and fxadapt optimise the same parameters "
            "(trainable counts below; fxadapt's are in the table).",
            "",
        ]
        for m, v, n in notes:
            t = methods[m].get("trainable", {})
            extra = f" Trainable: {t[v]:,}." if v in t else ""
            if v == "peft_eager_alt" and "peft_eager_alt" in methods[m].get("variants", {}):
                ms, x = _cell(methods[m], v)
                extra += f" Timed: {ms} ms, {x} floor."
            lines.append(f"- **{m}** ({'alternative' if v.endswith('alt') else 'table'}): {n}{extra}")
    skipped = results.get("skipped", {})
    if skipped:
        lines += ["", "## Skipped", ""]
        lines += [f"- {m}: {why}" for m, why in skipped.items()]
    errs = [(m, v, e) for m, r in methods.items() for v, e in r.get("errors", {}).items()]
    if errs:
        lines += ["", "## Errors", ""]
        for m, v, e in errs:
            lines.append(f"- {m} / {v} ({e['stage']}): `{e['error']}` (traceback in the JSON)")
    if results.get("runs"):
        lines += ["", "## Runs merged here", ""]
        for run in results["runs"]:
            ra = run["args"]
            lines.append(
                f"- `{run['file']}` ({run['date']}, {(run['total_s'] or 0) / 60:.1f} min, {ra['warmup']} warm-up, "
                f"{ra['steps']} timed rounds, up to {ra.get('max_steps', ra['steps'])}): "
                + ", ".join(run["methods"])
            )
    if "total_s" in results:
        lines += ["", f"Total run time {results['total_s'] / 60:.1f} min."]
    lines.append("")
    return "\n".join(lines)


def merge(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """One results dict from several runs: the first's machine and arguments, every run's methods (a
    later run's replacing an earlier one's), in the order of METHODS; ``runs`` says where each came from."""
    if len(runs) == 1:
        return runs[0]
    results = copy.deepcopy(runs[0])
    methods: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    sources = []
    for name, run in zip(names, runs):
        methods.update(run["methods"])
        skipped.update(run.get("skipped", {}))
        sources.append(
            {
                "file": name,
                "date": run["machine"]["date"],
                "methods": list(run["methods"]),
                "args": run["args"],
                "total_s": run.get("total_s"),
                "loadavg_start": run["machine"].get("loadavg_start"),
                "loadavg_end": run["machine"].get("loadavg_end"),
            }
        )
    order = [m for m in METHODS if m in methods] + [m for m in methods if m not in METHODS]
    results["methods"] = {m: methods[m] for m in order}
    results["skipped"] = {m: why for m, why in skipped.items() if m not in methods}
    results["runs"] = sources
    results["total_s"] = sum(r["total_s"] or 0 for r in sources)
    return results


def write(results: dict[str, Any], out: Path) -> None:
    derive(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_methods.json").write_text(json.dumps(results, indent=2))
    (out / "bench_methods.md").write_text(markdown(results))


# ---- main ----------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated method names (default: every method of the list that fxadapt registers)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per variant (default 5, 2 with --quick)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up steps per variant, compiling included (default 2, 1 with --quick)",
    )
    p.add_argument(
        "--min-undisturbed",
        type=int,
        default=3,
        help="on CPU, time more rounds (up to --max-steps) until every variant has this many undisturbed"
        " steps (default 3; 0 turns it off)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="most timed rounds per method, extra rounds included (default 2 x --steps)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        help="on CPU, before each timed round wait up to this many seconds until other processes use less"
        " than a quarter of a core (default 60, 0 with --quick; 0 turns it off)",
    )
    p.add_argument("--quick", action="store_true", help="tiny BERT config, few steps: checks that all runs")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder (default benchmarks/results)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto")
    p.add_argument(
        "--variants",
        default="fx_compiled,fx_eager,peft_eager",
        help="subset of fx_compiled,fx_eager,peft_eager (default all; the floor always runs)",
    )
    p.add_argument(
        "--no-floor-compiled",
        action="store_true",
        help="skip the compiled floor (one compile less)",
    )
    p.add_argument(
        "--report",
        metavar="JSON",
        nargs="+",
        help="only recompute the figures and markdown from results JSON(s); several are merged, a later"
        " file's methods replacing an earlier one's (e.g. methods measured once they were registered)",
    )
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 2 if args.quick else 5
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    if args.wait_quiet is None:
        args.wait_quiet = 0.0 if args.quick else 60.0
    if args.max_steps is None:
        args.max_steps = 2 * args.steps
    args.variants = {v.strip() for v in args.variants.split(",") if v.strip()}
    bad = args.variants - {"fx_compiled", "fx_eager", "peft_eager"}
    if bad:
        p.error(f"unknown variants {sorted(bad)}")
    return args


def select_methods(arg: str | None) -> tuple[list[str], dict[str, str]]:
    import fxadapt

    known = set(fxadapt.method_names())
    wanted = list(METHODS) if arg is None else [m.strip() for m in arg.split(",") if m.strip()]
    run = [m for m in wanted if m in known]
    skipped = {m: "not registered in fxadapt.method_names()" for m in wanted if m not in known}
    return run, skipped


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    if args.report:
        results = merge([json.loads(Path(f).read_text()) for f in args.report], args.report)
        write(results, out)
        print(markdown(results))
        return 0
    set_threads()
    device = pick_device(args.device)
    methods, skipped = select_methods(args.methods)
    for m, why in skipped.items():
        print(f"skipping {m}: {why}")
    if not methods:
        raise SystemExit("no method to measure")
    sp = spec(args.quick)
    results: dict[str, Any] = {
        "machine": machine_info(device),
        "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
        "shape": {
            "batch": sp.batch,
            "seq": sp.seq,
            "config": "tiny: hidden 128, 2 layers, 4 heads, intermediate 256"
            if args.quick
            else "BertConfig defaults: hidden 768, 12 layers, 12 heads, intermediate 3072",
        },
        "adapterhub_reference": ADAPTERHUB_REFERENCE,
        "target_ratio": TARGET,
        "skipped": skipped,
        "methods": {},
    }
    t_start = time.perf_counter()
    base = build_base(args.quick).to(device)
    batch = make_batch(sp, base, device)
    floors = build_floors(base, batch, args)
    bar = tqdm(methods, desc="methods", unit="method")
    for m in bar:
        bar.set_postfix_str(m)
        t0 = time.perf_counter()
        tqdm.write(f"[{t0 - t_start:7.0f} s] {m} ...")
        r = run_method(m, base, batch, floors, args, device)
        r["method_s"] = time.perf_counter() - t0
        results["methods"][m] = r
        results["machine"]["loadavg_end"] = os.getloadavg()
        results["total_s"] = time.perf_counter() - t_start
        write(results, out)
        v = r["variants"]
        summary = ", ".join(
            f"{k} {v[k]['median_s'] * 1000:.0f} ms ({v[k]['ratio_vs_floor'] or 0:.3f}x)" for k in v
        )
        tqdm.write(f"[{time.perf_counter() - t_start:7.0f} s] {m}: {summary}")
    bar.close()
    print(markdown(results))
    print(f"wrote {out / 'bench_methods.json'} and {out / 'bench_methods.md'} in {results['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
