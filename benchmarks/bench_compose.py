"""Composition benchmark: one row per composed setup, its variants timed side by side.

Rows (``ROWS``; each builds its variants over one base model, random init, batch 8 x 128, eval forward
under ``torch.no_grad``): the BERT-base-sized ``BertModel(BertConfig())`` and a Llama 4L/512 ``LlamaModel``
(4 layers, hidden 512, 8 heads, intermediate 1376, vocab 32000), one after the other (``--models``):

* ``route_lora8``: per-row routing of 8 LoRAs (r=8, alpha=16 on query and value, random ``B``), each row
  of the batch on another adapter, the assignment rotating every step: fxadapt compiled and eager
  (``adapter_names=``) against PEFT's mixed batch (``adapter_names=``, eager), against one LoRA on every
  row (fxadapt compiled: the floor; PEFT eager) and the plain model compiled. Target: fxadapt compiled
  <= 0.8x PEFT's mixed batch. The fxadapt adapters are PEFT's, loaded from its folder, and the row
  checks the outputs agree.
* ``adapterdrop_eval``: a seq_bn adapter with ``skip_layers=[0..4]`` (5 of BERT's 12 layers; 2 of Llama's
  4) against no skipping, both compiled, and the plain model compiled.

* ``parallel4``: ``Parallel`` of 4 seq_bn adapters in one pass against the 4 passes one adapter at a time
  (both compiled), and the plain model's one pass of 4·B rows against its 4 passes of B rows (what batching
  alone buys on the device); the row checks every channel equals its adapter alone. Target: <= 0.8x.
* ``fuse3_train``: a training step (forward, backward, AdamW) of ``Fuse`` over 3 seq_bn adapters (the
  fusion layers train) against one seq_bn adapter's, both compiled.

More rows go into ``ROWS``: a row is a name, a title, a builder returning its variants
(``{variant: step closure}``), the reference variant of its ratios and its targets. Per row, the variants
are warmed up (compiling included), then timed round-robin (A B C A B C ...); on CPU each round first
waits for a quiet machine (up to ``--wait-quiet`` s). The JSON keeps every sample, the load average before
and after each row and the other processes' load seen before each round.

Run ``python benchmarks/bench_compose.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):  # run from a checkout without installing; bench_lora sits beside us
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from bench_lora import _ms, _x, machine_info, pick_device, set_threads, summarize, sync  # noqa: E402
from bench_methods import other_load, wait_quiet  # noqa: E402
from tqdm import tqdm  # noqa: E402

LORA_R, LORA_ALPHA, N_LORAS, N_PARALLEL = 8, 16, 8, 4
TITLES = {"bert": "BERT-base-sized `BertModel(BertConfig())`", "llama": "Llama 4L/512 `LlamaModel`"}


@dataclass
class Row:
    """One composed setup: its variants (``build(base, batch, args) -> {variant: step}``) and targets."""

    name: str
    title: str
    build: Callable[[torch.nn.Module, dict[str, Any], argparse.Namespace], dict[str, Callable[[], None]]]
    ref: str  # ratios are to this variant
    labels: dict[str, str]
    # (variant, against, at most this ratio, what it means)
    targets: list[tuple[str, str, float, str]] = field(default_factory=list)


# ---- models and inputs ---------------------------------------------------------------------------
def build_base(kind: str, quick: bool) -> torch.nn.Module:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    if kind == "llama":
        size = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=1000)
        cfg = LlamaConfig(
            **(
                size
                if quick
                else dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, vocab_size=32000)
            ),
            num_hidden_layers=4,
        )
        return LlamaModel(cfg).eval()
    if quick:
        cfg = BertConfig(hidden_size=64, num_hidden_layers=12, num_attention_heads=4, intermediate_size=128)
    else:
        cfg = BertConfig()
    return BertModel(cfg).eval()


def lora_targets(base: torch.nn.Module) -> list[str]:
    return ["q_proj", "v_proj"] if base.config.model_type == "llama" else ["query", "value"]


def skip_layers(base: torch.nn.Module) -> list[int]:
    """AdapterDrop's first layers: 5 of BERT's 12, 2 of Llama's 4."""
    return list(range(5 if base.config.num_hidden_layers >= 12 else 2))


def make_batch(base: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1234)
    b, s = (2, 16) if args.quick else (8, 128)
    ids = torch.randint(0, base.config.vocab_size, (b, s), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _no_grad(fn: Callable[[], Any], keep: Any = None) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            fn()

    step.keep = keep  # type: ignore[attr-defined]
    return step


def _rotating(names: list[str]) -> Callable[[], list[str]]:
    """A new assignment of rows every call: the names rolled by one."""
    state = {"i": 0}

    def next_names() -> list[str]:
        i = state["i"] % len(names)
        state["i"] += 1
        return names[i:] + names[:i]

    return next_names


# ---- row: per-row routing of 8 LoRAs ---------------------------------------------------------------
def build_route(
    base: torch.nn.Module, batch: dict[str, Any], args: argparse.Namespace
) -> dict[str, Callable]:
    from peft import LoraConfig, get_peft_model

    import fxadapt

    rows = batch["input_ids"].shape[0]
    names = [f"a{i}" for i in range(N_LORAS)]
    assignment = [names[i % N_LORAS] for i in range(rows)]
    torch.manual_seed(1)
    cfg = dict(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=lora_targets(base), init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg), adapter_name=names[0])
    for n in names[1:]:
        peft_model.add_adapter(n, LoraConfig(**cfg))
    peft_model.eval()
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        for kind, compiled in (("compiled", True), ("eager", False)):
            m = fxadapt.AdaptedModel(base, compile=compiled)  # both wrap (share) the one base model
            for n in names:
                m.load_adapter(Path(tmp) / n, load_as=n)
            models[kind] = m.eval()
    fx, fx_eager = models["compiled"], models["eager"]
    with torch.no_grad():  # the same rows as PEFT's mixed batch (eager, no compile needed to check)
        ours = fx_eager(**batch, adapter_names=assignment).last_hidden_state
        theirs = peft_model(**batch, adapter_names=assignment).last_hidden_state
    args.checks[f"{base.config.model_type} route_lora8: max |fxadapt - PEFT| (mixed batch)"] = float(
        (ours - theirs).abs().max()
    )
    route, route_eager, mixed = _rotating(assignment), _rotating(assignment), _rotating(assignment)
    plain = torch.compile(base)

    def single() -> None:
        fx.set_active_adapters(names[0])
        fx(**batch)

    peft_single = copy.deepcopy(peft_model)
    peft_single.set_adapter(names[0])
    return {
        "fx_route": _no_grad(lambda: fx(**batch, adapter_names=route()), fx),
        "fx_route_eager": _no_grad(lambda: fx_eager(**batch, adapter_names=route_eager()), fx_eager),
        "peft_mixed": _no_grad(lambda: peft_model(**batch, adapter_names=mixed()), peft_model),
        "fx_single": _no_grad(single, fx),
        "peft_single": _no_grad(lambda: peft_single(**batch), peft_single),
        "plain_compiled": _no_grad(lambda: plain(**batch), plain),
    }


# ---- row: AdapterDrop at inference -------------------------------------------------------------------
def build_adapterdrop(
    base: torch.nn.Module, batch: dict[str, Any], args: argparse.Namespace
) -> dict[str, Callable]:
    import fxadapt

    model = fxadapt.AdaptedModel(base, compile=True)
    torch.manual_seed(2)
    model.add_adapter("a", "seq_bn[init_weights=bert]")
    model.eval()
    plain = torch.compile(base)

    skip5 = skip_layers(base)

    def run(skip: list[int] | None) -> Callable[[], None]:
        def step() -> None:
            model.set_active_adapters("a", skip_layers=skip)
            model(**batch)

        return _no_grad(step, model)

    return {
        "fx_skip5": run(skip5),
        "fx_noskip": run(None),
        "plain_compiled": _no_grad(lambda: plain(**batch), plain),
    }


# ---- row: Parallel of 4 adapters vs 4 separate passes --------------------------------------------
def build_parallel(
    base: torch.nn.Module, batch: dict[str, Any], args: argparse.Namespace
) -> dict[str, Callable]:
    import fxadapt

    names = [f"p{i}" for i in range(N_PARALLEL)]
    model = fxadapt.AdaptedModel(base, compile=True)
    torch.manual_seed(3)
    for n in names:
        model.add_adapter(n, "seq_bn[init_weights=bert]")
    model.eval()
    setup = fxadapt.Parallel(*names)
    with torch.no_grad():  # channel i of the Parallel output is adapter i alone
        model.set_active_adapters(setup)
        both = model(**batch).last_hidden_state
        rows = batch["input_ids"].shape[0]
        worst = 0.0
        for i, n in enumerate(names):
            model.set_active_adapters(n)
            alone = model(**batch).last_hidden_state
            worst = max(worst, float((both[i * rows : (i + 1) * rows] - alone).abs().max()))
    args.checks[f"{base.config.model_type} parallel4: max |channel - adapter alone|"] = worst

    def parallel() -> None:
        model.set_active_adapters(setup)
        model(**batch)

    def separate() -> None:
        for n in names:
            model.set_active_adapters(n)
            model(**batch)

    # the floor: what one pass of N·B rows buys over N passes of B rows for the plain model on this device
    plain = torch.compile(copy.deepcopy(base), dynamic=False)  # one static graph per batch size
    wide = {k: v.repeat(N_PARALLEL, *[1] * (v.dim() - 1)) for k, v in batch.items()}

    def plain_separate() -> None:
        for _ in names:
            plain(**batch)

    return {
        "fx_parallel": _no_grad(parallel, model),
        "fx_separate": _no_grad(separate, model),
        "plain_wide": _no_grad(lambda: plain(**wide), plain),
        "plain_separate": _no_grad(plain_separate, plain),
    }


# ---- row: a Fuse(3) training step vs a single seq_bn step ------------------------------------------
def build_fuse_train(
    base: torch.nn.Module, batch: dict[str, Any], args: argparse.Namespace
) -> dict[str, Callable]:
    import fxadapt

    def trainer(fuse: bool) -> Callable[[], None]:
        model = fxadapt.AdaptedModel(copy.deepcopy(base), compile=True)
        torch.manual_seed(4)
        if fuse:
            for n in ("a", "b", "c"):
                model.add_adapter(n, "seq_bn")
            model.add_adapter_fusion(fxadapt.Fuse("a", "b", "c"))
            model.train_adapter_fusion(fxadapt.Fuse("a", "b", "c"))
        else:
            model.add_adapter("a", "seq_bn")
            model.train_adapter("a")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step() -> None:
            loss = model(**batch).last_hidden_state.pow(2).mean()
            if fuse:
                loss = loss + model.fusion_regularization_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step.keep = model  # type: ignore[attr-defined]
        return step

    return {"fx_fuse3": trainer(True), "fx_seq_bn": trainer(False)}


ROWS = [
    Row(
        "route_lora8",
        f"Per-row routing of {N_LORAS} LoRAs (each row its own adapter, the assignment rotating every step)",
        build_route,
        ref="peft_mixed",
        labels={
            "fx_route": "fxadapt compiled, adapter_names=",
            "fx_route_eager": "fxadapt eager, adapter_names=",
            "peft_mixed": "PEFT eager, adapter_names= (mixed batch)",
            "fx_single": "fxadapt compiled, one LoRA on every row (the floor)",
            "peft_single": "PEFT eager, one LoRA on every row",
            "plain_compiled": "plain model compiled",
        },
        targets=[
            ("fx_route", "peft_mixed", 0.8, "routing <= 0.8x PEFT's mixed batch"),
            ("fx_route", "fx_single", float("inf"), "routing vs one adapter (the floor): reported"),
        ],
    ),
    Row(
        "adapterdrop_eval",
        "AdapterDrop at inference: seq_bn, skip_layers=[0..4] (5 of 12 layers; Llama [0, 1] of 4) vs no skipping",
        build_adapterdrop,
        ref="fx_noskip",
        labels={
            "fx_skip5": "fxadapt compiled, skip_layers=[0..4] (BERT), [0, 1] (Llama)",
            "fx_noskip": "fxadapt compiled, no skipping",
            "plain_compiled": "plain model compiled",
        },
        targets=[("fx_skip5", "fx_noskip", 1.0, "skipping the first layers is not slower than no skipping")],
    ),
    Row(
        "parallel4",
        f"Parallel of {N_PARALLEL} seq_bn adapters in one pass vs {N_PARALLEL} separate passes",
        build_parallel,
        ref="fx_separate",
        labels={
            "fx_parallel": f"fxadapt compiled, Parallel({N_PARALLEL} adapters): one pass, {N_PARALLEL}·B rows",
            "fx_separate": f"fxadapt compiled, {N_PARALLEL} passes, one adapter each",
            "plain_wide": f"plain model compiled, one pass of {N_PARALLEL}·B rows",
            "plain_separate": f"plain model compiled, {N_PARALLEL} passes of B rows",
        },
        targets=[
            ("fx_parallel", "fx_separate", 0.8, "Parallel <= 0.8x the separate passes"),
            (
                "plain_wide",
                "plain_separate",
                float("inf"),
                "the floor, plain model: one wide pass vs separate",
            ),
        ],
    ),
    Row(
        "fuse3_train",
        "AdapterFusion training step: Fuse(3 seq_bn) (fusion layers train) vs one seq_bn adapter training",
        build_fuse_train,
        ref="fx_seq_bn",
        labels={
            "fx_fuse3": "fxadapt compiled, Fuse(a, b, c) training step",
            "fx_seq_bn": "fxadapt compiled, one seq_bn training step",
        },
        targets=[("fx_fuse3", "fx_seq_bn", float("inf"), "Fuse(3) step vs a single adapter's: reported")],
    ),
]


# ---- timing ----------------------------------------------------------------------------------------
def run_row(row: Row, base: torch.nn.Module, batch: dict[str, Any], args, device) -> dict[str, Any]:
    res: dict[str, Any] = {"title": row.title, "ref": row.ref, "labels": row.labels, "errors": {}}
    res["loadavg_before"] = os.getloadavg()
    t0 = time.perf_counter()
    try:
        steps = row.build(base, batch, args)
    except Exception as exc:  # report it and go on with the next row
        res["errors"]["build"] = {
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
        tqdm.write(f"{row.name}: FAILED to build: {res['errors']['build']['error']}")
        return res
    res["build_s"] = time.perf_counter() - t0
    warm: dict[str, list[float]] = {}
    for k in tqdm(list(steps), desc=f"{row.name} warm-up", unit="variant", leave=False):
        warm[k] = []
        try:
            for _ in range(args.warmup):
                sync(device)
                t = time.perf_counter()
                steps[k]()
                sync(device)
                warm[k].append(time.perf_counter() - t)
        except Exception as exc:
            res["errors"][k] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            tqdm.write(f"{row.name} {k}: FAILED: {res['errors'][k]['error']}")
    steps = {k: v for k, v in steps.items() if k not in res["errors"]}
    raw: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    waits = []
    on_cpu = device.type == "cpu"
    for _ in tqdm(range(args.steps), desc=f"{row.name} timed", unit="round", leave=False):
        if on_cpu and args.wait_quiet > 0:
            waited, load = wait_quiet(args.wait_quiet)
            waits.append({"waited_s": waited, "other_load_cores": load})
        for k, fn in steps.items():
            sync(device)
            c0, t = time.process_time(), time.perf_counter()
            fn()
            sync(device)
            raw[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c0)
    res["loadavg_after"] = os.getloadavg()
    res["quiet_waits"] = waits
    res["variants"] = {
        k: {"warmup_s": warm[k], "raw_s": raw[k], "cpu_s": cpu[k] if on_cpu else None} for k in steps
    }
    res["targets"] = [list(t) for t in row.targets]
    del steps
    gc.collect()
    return res


def derive(results: dict[str, Any]) -> None:
    """Medians and ratios from the raw samples, in place."""
    for r in results["rows"].values():
        variants = r.get("variants", {})
        for v in variants.values():
            v.update(summarize(v["raw_s"], v["cpu_s"]))
        ref = variants.get(r["ref"])
        for v in variants.values():
            v["ratio"] = v["median_s"] / ref["median_s"] if ref else None
        verdicts = []
        for variant, against, limit, text in r.get("targets", []):
            a, b = variants.get(variant), variants.get(against)
            ratio = a["median_s"] / b["median_s"] if a and b else None
            met = None if ratio is None or limit == float("inf") else ratio <= limit
            verdicts.append({"target": text, "ratio": ratio, "limit": limit, "met": met})
        r["verdicts"] = verdicts


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Composition benchmark",
        "",
        f"{m['date']}, torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
        f"{m['cpu_count']} CPUs ({m['torch_threads']} threads), device {m['device']}. "
        f"Load average at start {_load(m['loadavg_start'])}, at end {_load(results.get('loadavg_end'))}.",
        "",
        f"Models: {', '.join(TITLES[k] for k in results['models'])}; random init, batch {results['batch']}, eval "
        f"forward under `torch.no_grad()`; {results['args']['steps']} timed rounds after {results['args']['warmup']} warm-up "
        "steps; medians. The undisturbed median keeps the steps whose CPU/wall ratio is near the variant's best "
        "(another process took no core meanwhile).",
        "",
    ]
    for key, r in results["rows"].items():
        kind, name = key.split("/")
        lines += [f"## `{name}` on {TITLES[kind]}: {r['title']}", ""]
        if "build" in r["errors"]:
            lines += [f"Failed to build: {r['errors']['build']['error']}", ""]
            continue
        lines += [
            f"Load average before {_load(r['loadavg_before'])}, after {_load(r['loadavg_after'])}; other "
            f"processes' load before each round (cores): {_other(r['quiet_waits'])}.",
            "",
            f"| variant | median ms | undisturbed median ms (n) | ratio to {r['labels'].get(r['ref'], r['ref'])} |",
            "|---|---:|---:|---:|",
        ]
        for k, v in r["variants"].items():
            und = v.get("median_undisturbed_s")
            n = v.get("n_undisturbed")
            lines.append(
                f"| {r['labels'].get(k, k)} | {_ms(v['median_s'])} | "
                f"{_ms(und)} ({n if n is not None else '-'}) | {_x(v['ratio'])} |"
            )
        lines.append("")
        for t in r["verdicts"]:
            met = "reported" if t["met"] is None else ("met" if t["met"] else "NOT met")
            lines.append(f"- {t['target']}: {_x(t['ratio'])} ({met})")
        for k, e in r["errors"].items():
            lines.append(f"- {k} failed: {e['error']}")
        lines.append("")
    if results.get("checks"):
        lines += ["## Checks", ""] + [f"- {k}: {v:.2e}" for k, v in results["checks"].items()] + [""]
    return "\n".join(lines)


def _load(avg: Any) -> str:
    return "n/a" if not avg else " / ".join(f"{x:.2f}" for x in avg)


def _other(waits: list[dict[str, Any]]) -> str:
    loads = [w["other_load_cores"] for w in waits if w.get("other_load_cores") is not None]
    if not loads:
        return "not measured"
    return f"median {sorted(loads)[len(loads) // 2]:.2f}, max {max(loads):.2f}"


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_compose.json").write_text(json.dumps(results, indent=1))
    (out / "bench_compose.md").write_text(markdown(results))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(r.name for r in ROWS), help="comma-separated rows to run")
    p.add_argument("--steps", type=int, default=None, help="timed rounds per row (default 7; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 2; 1 quick)")
    p.add_argument(
        "--wait-quiet", type=float, default=None, help="max seconds to wait for a quiet CPU per round"
    )
    p.add_argument("--models", default="bert,llama", help="comma-separated base models: bert, llama")
    p.add_argument("--quick", action="store_true", help="tiny models: checks that everything runs")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--report", default=None, help="rewrite the markdown from a results JSON, no measuring")
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.wait_quiet = args.wait_quiet if args.wait_quiet is not None else (0 if args.quick else 30)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.report:
        results = json.loads(Path(args.report).read_text())
        derive(results)
        write(results, Path(args.out))
        return 0
    set_threads()
    device = pick_device(args.device)
    wanted = args.rows.split(",")
    unknown = [n for n in wanted if n not in {r.name for r in ROWS}]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows: {[r.name for r in ROWS]}")
    args.checks = {}
    results: dict[str, Any] = {"machine": machine_info(device), "rows": {}}
    results["other_load_at_start_cores"] = other_load()
    results["models"] = args.models.split(",")
    for kind in results["models"]:
        base = build_base(kind, args.quick).to(device)
        batch = make_batch(base, args, device)
        results["batch"] = list(batch["input_ids"].shape)
        for row in [r for r in ROWS if r.name in wanted]:
            results["rows"][f"{kind}/{row.name}"] = run_row(row, base, batch, args, device)
            gc.collect()
        del base
    results["loadavg_end"] = os.getloadavg()
    results["checks"] = args.checks
    results["args"] = {k: v for k, v in vars(args).items() if k != "checks"}
    derive(results)
    write(results, Path(args.out))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
