"""LoRA benchmark: fxadapt against PEFT and against the plain model.

Measures, for LoRA (r=8, alpha=16, on the query and value projections) on a BERT-base-sized
classifier and a small Llama:

* training step time (forward + loss + backward + AdamW step), variants interleaved step by step:
  fxadapt compiled, fxadapt eager, PEFT eager, PEFT + torch.compile, and the floor (the plain model,
  every weight frozen, forward + backward from ``inputs_embeds`` that require grad); ratios vs the floor;
* eval forward time (``torch.no_grad``, eval mode): fxadapt merged and unmerged against the plain model
  eager and compiled; ratios vs the plain model compiled;
* peak memory of each training variant, each in its own process; ratios vs PEFT eager;
* time to the first training step in a fresh process with an empty inductor cache (cold) and with the
  cache that a cold process left (warm), for fxadapt compiled and PEFT + torch.compile.

Run ``python benchmarks/bench_lora.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

TRAIN_VARIANTS = (
    "fx_compiled",
    "fx_whole",
    "fx_eager",
    "peft_eager",
    "peft_compiled",
    "floor",
    "floor_compiled",
)
EVAL_VARIANTS = ("fx_merged", "fx_unmerged", "plain_eager", "plain_compiled")
MEMORY_VARIANTS = ("fx_compiled", "fx_whole", "fx_eager", "peft_eager", "peft_compiled", "floor")
STARTUP_RUNS = (  # (label, variant, cache): "cold" gets an empty cache dir, "warm" reuses the cold one
    ("fx_compiled_cold", "fx_compiled", "cold"),
    ("fx_compiled_warm", "fx_compiled", "warm"),
    ("fx_whole_cold", "fx_whole", "cold"),
    ("fx_whole_warm", "fx_whole", "warm"),
    ("peft_compiled_cold", "peft_compiled", "cold"),
    ("peft_compiled_warm", "peft_compiled", "warm"),
)
LABELS = {
    "fx_compiled": 'fxadapt compiled by region (compile="regional")',
    "fx_whole": 'fxadapt compiled whole (compile="whole")',
    "fx_eager": "fxadapt eager",
    "peft_eager": "PEFT eager",
    "peft_compiled": "PEFT + torch.compile",
    "floor": "floor (plain model, frozen, eager)",
    "floor_compiled": "floor compiled (plain model, frozen, torch.compile)",
    "fx_merged": "fxadapt merged (compiled)",
    "fx_unmerged": "fxadapt unmerged (compiled)",
    "plain_eager": "plain model eager",
    "plain_compiled": "plain model compiled",
}
FX_COMPILE = {"fx_compiled": "regional", "fx_whole": "whole", "fx_eager": False}
MODEL_TITLES = {"bert": "BERT-base", "llama": "Llama 4L/512"}
LORA_R, LORA_ALPHA = 8, 16


# ---- models and inputs ---------------------------------------------------------------------------
@dataclass
class Spec:
    name: str
    batch: int
    seq: int
    peft_targets: list[str]
    static: dict[str, Any]  # non-tensor keyword arguments passed to every variant


def model_spec(name: str, quick: bool) -> Spec:
    if name == "bert":
        return Spec("bert", 2 if quick else 8, 32 if quick else 128, ["query", "value"], {})
    if name == "llama":
        return Spec(
            "llama",
            2 if quick else 4,
            32 if quick else 128,
            ["q_proj", "v_proj"],
            {"use_cache": False},
        )
    raise SystemExit(f"unknown model {name!r}; choose from bert, llama")


def build_base(name: str, quick: bool) -> torch.nn.Module:
    """The base model, randomly initialised from a config (seeded, so every process builds the same)."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if name == "bert":
        cfg = (
            BertConfig()
            if not quick
            else BertConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                vocab_size=1000,
            )
        )
        return BertForSequenceClassification(cfg)
    cfg = LlamaConfig(
        hidden_size=64 if quick else 512,
        intermediate_size=172 if quick else 1376,
        num_hidden_layers=2 if quick else 4,
        num_attention_heads=4 if quick else 8,
        num_key_value_heads=4 if quick else 8,
        vocab_size=1000 if quick else 32000,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(cfg)


def make_batch(spec: Spec, model: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """One random batch (seeded), with labels; every variant runs on exactly these tensors."""
    g = torch.Generator().manual_seed(1234)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (spec.batch, spec.seq), generator=g)
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if spec.name == "bert":
        batch["labels"] = torch.randint(0, model.config.num_labels, (spec.batch,), generator=g)
    else:
        batch["labels"] = ids.clone()
    batch = {k: v.to(device) for k, v in batch.items()}
    return {**batch, **spec.static}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- variants ------------------------------------------------------------------------------------
def fx_config():
    import fxadapt

    return fxadapt.LoRAConfig(r=LORA_R, alpha=LORA_ALPHA, attn_matrices=["q", "v"])


def peft_config(spec: Spec):
    from peft import LoraConfig

    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=spec.peft_targets)


def make_train_step(
    kind: str, model: torch.nn.Module, spec: Spec, batch: dict[str, Any]
) -> Callable[[], None]:
    """A closure running one training step of variant ``kind`` on ``model`` (which it takes over)."""
    model.train()
    if kind in FX_COMPILE:
        import fxadapt

        m = fxadapt.adapt(model, fx_config(), compile=FX_COMPILE[kind])
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step() -> None:
            out = m(**batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step.keep = m  # type: ignore[attr-defined]
        return step
    if kind in ("peft_eager", "peft_compiled"):
        from peft import get_peft_model

        pm = get_peft_model(model, peft_config(spec))
        pm.train()
        fn = torch.compile(pm) if kind == "peft_compiled" else pm
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step() -> None:
            out = fn(**batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step.keep = (pm, fn)  # type: ignore[attr-defined]
        return step
    if kind in ("floor", "floor_compiled"):
        # Every weight frozen; the input embeddings are a leaf that requires grad, so backward runs
        # through every layer (as LoRA's does) but computes no weight gradient and no optimizer step.
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            emb = model.get_input_embeddings()(batch["input_ids"])
        emb.requires_grad_(True)
        fb = {k: v for k, v in batch.items() if k != "input_ids"}
        fb["inputs_embeds"] = emb
        fn = torch.compile(model) if kind == "floor_compiled" else model

        def step() -> None:
            out = fn(**fb)
            out.loss.backward()
            emb.grad = None

        step.keep = (model, fn)  # type: ignore[attr-defined]
        return step
    raise ValueError(kind)


def make_eval_step(kind: str, model: torch.nn.Module, batch: dict[str, Any]) -> Callable[[], None]:
    """A closure running one no-grad eval forward of variant ``kind`` (labels dropped)."""
    eb = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    if kind in ("fx_merged", "fx_unmerged"):
        import fxadapt

        fn = fxadapt.adapt(model, fx_config(), compile=True)
        fn.eval()
        if kind == "fx_merged":
            fn.merge_adapter("lora")
    elif kind == "plain_compiled":
        fn = torch.compile(model)
    elif kind == "plain_eager":
        fn = model
    else:
        raise ValueError(kind)

    def step() -> None:
        with torch.no_grad():
            fn(**eb)

    step.keep = fn  # type: ignore[attr-defined]
    return step


# ---- timing ----------------------------------------------------------------------------------------
UNDISTURBED = 0.9  # a CPU step counts as undisturbed if its CPU/wall ratio is >= 0.9 x the variant's best


def summarize(samples: list[float], cpu: list[float] | None = None) -> dict[str, Any]:
    """Median and spread of the timed steps; on CPU also the median of the undisturbed steps.

    A step during which another process took a core shows as a CPU/wall ratio near 1 instead of the
    thread count (the OpenMP threads wait for each other); those steps are several times slower.
    """
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    out: dict[str, Any] = {
        "median_s": statistics.median(samples),
        "p25_s": q[0],
        "p75_s": q[2],
        "min_s": min(samples),
        "mean_s": statistics.fmean(samples),
    }
    if cpu:
        util = [c / w if w > 0 else 0.0 for c, w in zip(cpu, samples)]
        best = max(util)
        keep = [w for w, u in zip(samples, util) if u >= UNDISTURBED * best]
        out.update(
            cpu_per_wall=util,
            n_undisturbed=len(keep),
            median_undisturbed_s=statistics.median(keep) if keep else None,
        )
    return out


def interleaved(
    steps: dict[str, Callable[[], None]],
    n_steps: int,
    n_warmup: int,
    device: torch.device,
    desc: str,
) -> dict[str, Any]:
    """Warm every variant up, then time them round-robin (A B C A B C ...): ``n_steps`` samples each."""
    warm: dict[str, list[float]] = {k: [] for k in steps}
    for k in tqdm(list(steps), desc=f"{desc} warm-up", unit="variant", leave=False):
        for _ in range(n_warmup):
            sync(device)
            t0 = time.perf_counter()
            steps[k]()
            sync(device)
            warm[k].append(time.perf_counter() - t0)
    raw: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}  # process CPU time (all threads) per step
    faults: dict[str, list[int]] = {k: [] for k in steps}  # minor page faults (fresh memory) per step
    for _ in tqdm(range(n_steps), desc=f"{desc} timed", unit="round", leave=False):
        for k, fn in steps.items():
            sync(device)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            sync(device)
            raw[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
            faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    cpu_ok = device.type == "cpu"
    return {
        k: {"warmup_s": warm[k], "raw_s": raw[k], "cpu_s": cpu[k] if cpu_ok else None, "minflt": faults[k]}
        for k in steps
    }


def run_train(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    spec = model_spec(name, args.quick)
    base = build_base(name, args.quick).to(device)
    batch = make_batch(spec, base, device)
    steps = {}
    for kind in tqdm(args.train_variants, desc=f"{name} build train variants", leave=False):
        steps[kind] = make_train_step(kind, copy.deepcopy(base), spec, batch)
    res = interleaved(steps, args.steps, args.warmup, device, f"{name} train")
    del steps
    gc.collect()
    return res


def run_eval(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    spec = model_spec(name, args.quick)
    base = build_base(name, args.quick).to(device)
    batch = make_batch(spec, base, device)
    steps = {}
    for kind in tqdm(EVAL_VARIANTS, desc=f"{name} build eval variants", leave=False):
        steps[kind] = make_eval_step(kind, copy.deepcopy(base), batch)
    res = interleaved(steps, args.steps, args.warmup, device, f"{name} eval")
    del steps
    gc.collect()
    return res


# ---- workers (separate processes) ------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def keep_freed_memory() -> str:
    """Make glibc keep the memory a step frees for the next step instead of returning it to the OS.

    By default glibc returns freed memory at the top of its heaps (and every block above its mmap
    threshold) to the kernel, so the next step's tensors fault in fresh zeroed pages; a step that frees
    memory in many small rounds (regional compilation, eager) pays more of that than one compiled
    graph that reuses its buffers. Returns what was set, for the record.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as exc:
        raise SystemExit(
            f"--keep-freed-memory needs glibc (libc.so.6 did not load: {exc}); drop the flag"
        ) from exc
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    settings = {m_trim_threshold: 2**31 - 1, m_top_pad: 2**29, m_mmap_threshold: 2**25}
    if not all(libc.mallopt(k, v) for k, v in settings.items()):
        raise SystemExit("--keep-freed-memory: glibc's mallopt refused a setting")
    return "glibc keeps freed memory (mallopt: trim threshold 2 GiB, top pad 512 MiB, mmap threshold 32 MiB)"


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this (fresh) process: time to first step, then peak memory of further steps."""
    import resource

    device = pick_device(args.device)
    spec = model_spec(args.model, args.quick)
    base = build_base(args.model, args.quick).to(device)
    batch = make_batch(spec, base, device)
    out: dict[str, Any] = {
        "model": args.model,
        "variant": args.variant,
        "pid": os.getpid(),
    }
    out["rss_after_model_mib"] = (_status_kib("VmRSS") or 0) / 1024
    sync(device)
    t0 = time.perf_counter()
    step = make_train_step(args.variant, base, spec, batch)
    t1 = time.perf_counter()
    step()
    sync(device)
    t2 = time.perf_counter()
    out.update(time_to_first_step_s=t2 - t0, setup_s=t1 - t0, first_step_s=t2 - t1)
    captures = getattr(getattr(step, "keep", None), "_captures", None)
    if captures is not None:  # how many torch.export captures fxadapt made before the first step ended
        out["fx_captures"] = len(captures)
    if args.worker == "startup":
        return out
    for _ in range(max(args.warmup - 1, 1)):
        step()
    sync(device)
    gc.collect()
    _malloc_trim()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_base = torch.cuda.memory_allocated(device)
    out["rss_peak_before_steps_mib"] = (_status_kib("VmHWM") or 0) / 1024  # includes compiling
    out["hwm_reset"] = _reset_peak_rss()
    rss_base = _status_kib("VmRSS") or 0
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.mem_steps):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    rss_peak = _status_kib("VmHWM") if out["hwm_reset"] else None
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.update(
        rss_baseline_mib=rss_base / 1024,
        rss_peak_mib=(rss_peak / 1024) if rss_peak is not None else None,
        rss_increase_mib=((rss_peak - rss_base) / 1024) if rss_peak is not None else None,
        process_peak_rss_mib=max(out["rss_peak_before_steps_mib"], (rss_peak or 0) / 1024),
        # ru_maxrss can carry the parent's peak into a spawned child; kept for reference only
        ru_maxrss_mib=maxrss_after / 1024,
        ru_maxrss_increase_mib=(maxrss_after - maxrss_before) / 1024,
        step_times_s=times,
    )
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out.update(
            cuda_baseline_mib=cuda_base / 2**20,
            cuda_peak_mib=peak / 2**20,
            cuda_increase_mib=(peak - cuda_base) / 2**20,
        )
    return out


def spawn(
    args: argparse.Namespace, mode: str, model: str, variant: str, env: dict[str, str]
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        mode,
        "--model",
        model,
        "--variant",
        variant,
        "--result",
        result_path,
        "--device",
        args.device,
        "--warmup",
        str(args.warmup),
        "--mem-steps",
        str(args.mem_steps),
    ] + (["--quick"] if args.quick else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    try:
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-3000:]
            return {
                "error": f"worker exited with {proc.returncode}",
                "stderr_tail": tail,
                "wall_s": wall,
            }
        with open(result_path) as f:
            res = json.load(f)
        res["process_wall_s"] = wall
        return res
    finally:
        os.unlink(result_path)


def run_memory(name: str, args: argparse.Namespace, cache_dir: str) -> dict[str, Any]:
    env = dict(
        os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, FXADAPT_CACHE_DIR=os.path.join(cache_dir, "fxadapt")
    )
    # Large allocations straight from mmap and back to the OS on free, so RSS follows live tensors
    # instead of what glibc's heap keeps; set explicitly, this also turns off glibc's dynamic threshold.
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    res = {}
    for kind in tqdm(MEMORY_VARIANTS, desc=f"{name} memory (1 process each)", leave=False):
        res[kind] = spawn(args, "memory", name, kind, env)
    return res


def run_startup(name: str, args: argparse.Namespace) -> dict[str, Any]:
    res = {}
    dirs: dict[str, str] = {}
    try:
        for label, kind, cache in tqdm(
            STARTUP_RUNS, desc=f"{name} compile time (1 process each)", leave=False
        ):
            if cache == "cold":
                dirs[kind] = tempfile.mkdtemp(prefix=f"bench-inductor-{name}-{kind}-")
            # the warm process reuses the cold one's inductor cache and fxadapt's disk cache
            env = dict(
                os.environ,
                TORCHINDUCTOR_CACHE_DIR=dirs[kind],
                FXADAPT_CACHE_DIR=os.path.join(dirs[kind], "fxadapt"),
            )
            runs = [
                spawn(args, "startup", name, kind, env)
                for _ in range(1 if cache == "cold" else args.warm_repeats)
            ]
            res[label] = _median_run(runs)
            res[label]["cache"] = cache
    finally:
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    return res


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median time to the first step, with every run's times (a failed run wins)."""
    failed = [r for r in runs if "error" in r]
    if failed or len(runs) == 1:
        return failed[0] if failed else runs[0]
    ordered = sorted(runs, key=lambda r: r["time_to_first_step_s"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["runs_time_to_first_step_s"] = [r["time_to_first_step_s"] for r in runs]
    return out


def _ratios(section: dict[str, Any], ref: str, key: str = "median_s", name: str | None = None) -> None:
    name = name or ref
    base = section.get(ref, {}).get(key)
    for v in section.values():
        if isinstance(v, dict):
            v[f"ratio_vs_{name}"] = v[key] / base if base and v.get(key) is not None else None


def derive(results: dict[str, Any]) -> None:
    """(Re)compute every median and ratio from the raw figures, in place."""
    cuda = results["machine"]["device"].startswith("cuda")
    for r in results["models"].values():
        for section in ("train", "eval"):
            for v in r.get(section, {}).values():
                v.update(summarize(v["raw_s"], v.get("cpu_s")))
                if v.get("minflt"):
                    v["median_minflt"] = statistics.median(v["minflt"])
        tr = r.get("train", {})
        for ref in ("floor", "floor_compiled"):
            if ref in tr:
                _ratios(tr, ref)
                _ratios(tr, ref, "median_undisturbed_s", f"{ref}_undisturbed")
        ev = r.get("eval", {})
        if "plain_compiled" in ev:
            _ratios(ev, "plain_compiled")
            _ratios(
                ev,
                "plain_compiled",
                "median_undisturbed_s",
                "plain_compiled_undisturbed",
            )
        mem = r.get("memory", {})
        key = "cuda_increase_mib" if cuda else "rss_increase_mib"
        for v in mem.values():
            v["metric"] = key
        _ratios(mem, "peft_eager", key)
        st = r.get("startup", {})
        if st:
            fx = st.get("fx_compiled_cold", {}).get("time_to_first_step_s")
            pf = st.get("peft_compiled_cold", {}).get("time_to_first_step_s")
            st["ratio_fx_cold_vs_peft_cold"] = fx / pf if fx and pf else None


# ---- report ----------------------------------------------------------------------------------------
def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def machine_info(device: torch.device) -> dict[str, Any]:
    import peft
    import transformers

    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "loadavg_start": os.getloadavg(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _ms(s: float | None) -> str:
    return "n/a" if s is None else f"{s * 1000:.0f}"


def _x(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}x"


def _mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(target, model, measured, met) rows."""
    rows = []
    for name, r in results["models"].items():
        t = MODEL_TITLES.get(name, name)
        tr = r.get("train", {})
        if "fx_compiled" in tr and "floor" in tr:
            v = tr["fx_compiled"]["ratio_vs_floor"]
            rows.append(
                (
                    "training step <= 1.02x floor (fxadapt compiled)",
                    t,
                    _x(v),
                    _met(v <= 1.02),
                )
            )
            u = tr["fx_compiled"].get("ratio_vs_floor_undisturbed")
            if u is not None:
                rows.append(("  same, undisturbed steps", t, _x(u), _met(u <= 1.02)))
        mem = r.get("memory", {})
        for var, what in (("fx_compiled", "regional"), ("fx_whole", "whole")):
            if var in mem:
                v = mem[var].get("ratio_vs_peft_eager")
                rows.append(
                    (
                        f"training peak memory <= 0.85x PEFT eager (fxadapt compiled, {what})",
                        t,
                        _x(v),
                        _met(v is not None and v <= 0.85),
                    )
                )
        ev = r.get("eval", {})
        if ev:
            for var, what, limit in (
                ("fx_merged", "merged", 1.02),
                ("fx_unmerged", "unmerged", 1.05),
            ):
                v = ev[var]["ratio_vs_plain_compiled"]
                rows.append(
                    (
                        f"{what} inference <= {limit}x plain compiled",
                        t,
                        _x(v),
                        _met(v <= limit),
                    )
                )
                u = ev[var].get("ratio_vs_plain_compiled_undisturbed")
                if u is not None:
                    rows.append(("  same, undisturbed steps", t, _x(u), _met(u <= limit)))
        if "fx_compiled" in tr and "fx_whole" in tr:
            v = tr["fx_compiled"]["median_s"] / tr["fx_whole"]["median_s"]
            rows.append(("regional step <= 1.01x whole-graph step", t, _x(v), _met(v <= 1.01)))
            e = tr.get("fx_eager")
            if e is not None:
                v = tr["fx_compiled"]["median_s"] / e["median_s"]
                rows.append(("compiled (regional) step <= eager step", t, _x(v), _met(v <= 1.0)))
        st = r.get("startup", {})
        if st:
            fx = st.get("fx_compiled_cold", {}).get("time_to_first_step_s")
            pf = st.get("peft_compiled_cold", {}).get("time_to_first_step_s")
            ok = fx is not None and pf is not None and fx <= 0.5 * pf
            rows.append(
                (
                    "cold compile (regional) <= 0.5x PEFT + torch.compile",
                    t,
                    f"{fx:.1f} s vs {pf:.1f} s ({fx / pf:.2f}x)" if fx and pf else "n/a",
                    _met(ok),
                )
            )
            w = st.get("fx_compiled_warm", {}).get("time_to_first_step_s")
            rows.append(
                ("warm start <= 5 s", t, f"{w:.1f} s" if w else "n/a", _met(w is not None and w <= 5))
            )
    return rows


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def markdown(results: dict[str, Any]) -> str:
    info = results["machine"]
    models = list(results["models"])
    titles = [MODEL_TITLES.get(m, m) for m in models]
    a = results["args"]
    lines = [
        f"# fxadapt LoRA benchmark: {info['date']}",
        "",
        f"Device {info['device']}, {info['cpu_count']} CPUs, {info['torch_threads']} torch threads, "
        f"torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}; "
        f"{a['steps']} timed steps after {a['warmup']} warm-up steps, medians; "
        f"load average at start {', '.join(f'{x:.2f}' for x in info['loadavg_start'])}"
        + (" (--quick: tiny configs)" if a["quick"] else "")
        + ".",
        "",
    ]

    def table(section: str, variants: tuple[str, ...], ratio_key: str, ratio_title: str) -> None:
        head = (
            "| Variant | "
            + " | ".join(
                f"{t} ms | {ratio_title} | {t} ms undisturbed | {ratio_title} undisturbed" for t in titles
            )
            + " |"
        )
        lines.extend([head, "|---" * (1 + 4 * len(models)) + "|"])
        for v in variants:
            cells = []
            present = False
            for m in models:
                d = results["models"][m].get(section, {}).get(v)
                present |= d is not None
                cells += [_ms(d and d["median_s"]), _x(d and d.get(ratio_key))]
                n = d and d.get("n_undisturbed")
                cells += [
                    _ms(d and d.get("median_undisturbed_s")) + (f" (n={n})" if n is not None else ""),
                    _x(d and d.get(ratio_key + "_undisturbed")),
                ]
            if present:
                lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
        lines.append("")

    lines += [
        "Undisturbed: the median over the timed steps whose CPU/wall ratio was at least"
        f" {UNDISTURBED} x the best of that variant (steps during which no other process took a core).",
        "",
        "## Training step (forward + loss + backward + AdamW), median",
        "",
    ]
    table("train", TRAIN_VARIANTS, "ratio_vs_floor", "x floor")
    faults = {
        v: [results["models"][m].get("train", {}).get(v, {}).get("median_minflt") for m in models]
        for v in TRAIN_VARIANTS
    }
    if any(x is not None for row in faults.values() for x in row):
        lines += [
            f"Minor page faults per training step (median; allocator: {info.get('allocator', 'glibc defaults')}):",
            "",
            "| Variant | " + " | ".join(titles) + " |",
            "|---" * (1 + len(models)) + "|",
        ]
        for v, row in faults.items():
            if any(x is not None for x in row):
                lines.append(
                    f"| {LABELS[v]} | " + " | ".join("n/a" if x is None else f"{x:.0f}" for x in row) + " |"
                )
        lines.append("")
    lines += ["## Eval forward (no_grad, eval mode), median", ""]
    table("eval", EVAL_VARIANTS, "ratio_vs_plain_compiled", "x plain compiled")

    lines += ["## Training peak memory (each variant in its own process)", ""]
    lines.append(
        "Increase of peak RSS over the RSS after warm-up, during further training steps"
        " (MiB); on CUDA, max_memory_allocated over memory_allocated."
    )
    lines.append("")
    lines.append("Process peak RSS is the whole process's peak, compiling and model included.")
    lines.append("")
    lines.append(
        "| Variant | "
        + " | ".join(f"{t} MiB | x PEFT eager | {t} process peak RSS MiB" for t in titles)
        + " |"
    )
    lines.append("|---" * (1 + 3 * len(models)) + "|")
    for v in MEMORY_VARIANTS:
        cells = []
        present = False
        for m in models:
            d = results["models"][m].get("memory", {}).get(v)
            present |= d is not None
            if d is None or "error" in d:
                cells += ["error" if d else "n/a", "n/a", "n/a"]
                continue
            cells += [
                _mib(d.get(d["metric"])),
                _x(d.get("ratio_vs_peft_eager")),
                _mib(d.get("process_peak_rss_mib")),
            ]
        if present:
            lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
    lines.append("")

    lines += ["## Time to first training step (fresh process each)", ""]
    lines.append(
        "Seconds from wrapping the model (adapt / get_peft_model + torch.compile) to the end of the"
        " first training step: total (wrap + first step). Cold: empty inductor cache; warm: the cache"
        " the cold process left"
        + (f" (the median of {a['warm_repeats']} processes)." if a.get("warm_repeats", 1) > 1 else ".")
    )
    lines.append("")
    lines.append("| Run | " + " | ".join(f"{t} s" for t in titles) + " |")
    lines.append("|---" * (1 + len(models)) + "|")
    for label, _, _ in STARTUP_RUNS:
        cells = []
        for m in models:
            d = results["models"][m].get("startup", {}).get(label)
            if d is None:
                cells.append("n/a")
            elif "error" in d:
                cells.append("error")
            else:
                cell = f"{d['time_to_first_step_s']:.1f}"
                if "setup_s" in d:
                    cell += f" ({d['setup_s']:.1f} + {d['first_step_s']:.1f})"
                cells.append(cell)
        lines.append(f"| {label.replace('_', ' ')} | " + " | ".join(cells) + " |")
    lines.append("")

    rows = targets(results)
    if rows:
        lines += [
            "## Targets",
            "",
            "| Target | Model | Measured | Status |",
            "|---|---|---|---|",
        ]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
        lines.append("")
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> None:
    derive(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_lora.json").write_text(json.dumps(results, indent=2))
    (out / "bench_lora.md").write_text(markdown(results))


# ---- main ------------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="bert,llama", help="comma-separated: bert, llama")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per variant (default 10, 3 with --quick)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up steps per variant (default 3, 1 with --quick)",
    )
    p.add_argument(
        "--mem-steps",
        type=int,
        default=3,
        help="steps measured in each memory process (default 3)",
    )
    p.add_argument("--quick", action="store_true", help="tiny configs and few steps: a smoke run")
    p.add_argument(
        "--out",
        default=str(HERE / "results"),
        help="output folder (default benchmarks/results)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA if available, else CPU), cpu or cuda",
    )
    p.add_argument(
        "--sections",
        default="train,eval,memory,startup",
        help="comma-separated subset of train,eval,memory,startup",
    )
    p.add_argument(
        "--no-floor-compiled",
        action="store_true",
        help="skip the extra compiled floor in the training timings (saves one compile per model)",
    )
    p.add_argument(
        "--report",
        metavar="JSON",
        help="only rewrite the markdown (and derived figures) from a results JSON",
    )
    p.add_argument(
        "--warm-repeats",
        type=int,
        default=3,
        help="startup section: warm processes per variant, the median reported (default 3)",
    )
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="train/eval sections: glibc keeps freed memory for the next step (no page faults); "
        "see docs/performance.md",
    )
    p.add_argument("--worker", choices=["memory", "startup"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    if args.warm_repeats < 1:
        p.error(f"--warm-repeats must be >= 1 (warm processes per variant), got {args.warm_repeats}")
    args.train_variants = tuple(
        v for v in TRAIN_VARIANTS if not (args.no_floor_compiled and v == "floor_compiled")
    )
    return args


def set_threads() -> None:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    torch.set_num_threads(n)
    for knob in (
        "recompile_limit",
        "cache_size_limit",
        "accumulated_recompile_limit",
        "accumulated_cache_size_limit",
    ):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    set_threads()
    if args.worker:
        res = worker(args)
        with open(args.result, "w") as f:
            json.dump(res, f)
        return 0
    if args.report:
        results = json.loads(Path(args.report).read_text())
        write(results, Path(args.out))
        print(markdown(results))
        return 0

    device = pick_device(args.device)
    allocator = keep_freed_memory() if args.keep_freed_memory else "glibc defaults"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    for m in models:
        model_spec(m, args.quick)
    out = Path(args.out)
    # A fresh inductor cache for this run's in-process compiles; the memory processes reuse it (warm),
    # the compile-time processes get their own empty ones.
    cache_dir = tempfile.mkdtemp(prefix="bench-inductor-run-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    results: dict[str, Any] = {
        "machine": {**machine_info(device), "allocator": allocator},
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "model", "variant", "result")},
        "models": {m: {} for m in models},
    }
    t_start = time.perf_counter()
    try:
        for m in models:
            spec = model_spec(m, args.quick)
            results["models"][m]["shape"] = {"batch": spec.batch, "seq": spec.seq}
            plan = [
                ("train", run_train),
                ("eval", run_eval),
                ("memory", run_memory),
                ("startup", run_startup),
            ]
            for section, fn in plan:
                if section not in sections:
                    continue
                t0 = time.perf_counter()
                tqdm.write(f"[{time.perf_counter() - t_start:7.0f} s] {m}: {section} ...")
                if section == "memory":
                    results["models"][m][section] = fn(m, args, cache_dir)
                elif section == "startup":
                    results["models"][m][section] = fn(m, args)
                else:
                    results["models"][m][section] = fn(m, args, device)
                results["models"][m][f"{section}_section_s"] = time.perf_counter() - t0
                results["machine"]["loadavg_end"] = os.getloadavg()
                results["total_s"] = time.perf_counter() - t_start
                write(results, out)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    print(markdown(results))
    print(
        f"wrote {out / 'bench_lora.json'} and {out / 'bench_lora.md'} in {time.perf_counter() - t_start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
