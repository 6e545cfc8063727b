"""Peak training memory with and without activation checkpointing (all-MiniLM-L6-v2, long sequences).

Variants, each in its own process: fxadapt LoRA + classification head without checkpointing, with
``gradient_checkpointing_enable()`` (each layer recomputed), with ``every_n_layers=2``, and PEFT LoRA on
``BertForSequenceClassification`` without and with HF's own checkpointing (for reference). Per variant,
after one warm-up step (the capture): the peak resident memory a training step adds (the kernel's peak
RSS mark reset before the step, heap trimmed, ``MALLOC_MMAP_THRESHOLD_`` low so freed tensors go back to
the OS), the bytes autograd keeps for the backward (distinct storages of the saved tensors), and the
median step time.

    python benchmarks/bench_checkpointing.py                 # batch 8, 512 tokens
    python benchmarks/bench_checkpointing.py --batch 4 --length 256 --steps 2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

VARIANTS = (
    "fxadapt",
    "fxadapt_checkpointing",
    "fxadapt_checkpointing_every_2",
    "peft",
    "peft_hf_checkpointing",
)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _build(variant: str) -> torch.nn.Module:
    import sst2_minilm

    recipe = dict(sst2_minilm.RECIPE, compile=False)
    if variant.startswith("peft"):
        model = sst2_minilm.build("peft_lora", recipe)
        if variant == "peft_hf_checkpointing":
            model.base_model.model.activation_checkpointing_enable({"use_reentrant": False})
        return model
    model = sst2_minilm.build("fxadapt_lora", recipe)
    if variant == "fxadapt_checkpointing":
        model.gradient_checkpointing_enable()
    elif variant == "fxadapt_checkpointing_every_2":
        model.activation_checkpointing_enable(every_n_layers=2)
    return model


def worker(variant: str, batch: int, length: int, steps: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _build(variant)
    model.train()
    ids = torch.randint(1000, 29000, (batch, length))
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (batch,)),
    }
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        loss = model(**inputs).loss
        loss.backward()
        for p in params:
            p.grad = None

    step()  # capture (and the first allocation of everything)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs).loss.backward()
    for p in params:
        p.grad = None
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {
        "variant": variant,
        "peak_increase_mib": (_status_kib("VmHWM") - base) / 1024,
        "saved_for_backward_mib": sum(saved.values()) / 2**20,
        "step_seconds_median": statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=str(HERE / "results" / "bench_checkpointing.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.length, args.steps)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    rows = []
    for variant in args.variants.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            variant,
            "--batch",
            str(args.batch),
            "--length",
            str(args.length),
        ]
        done = subprocess.run(cmd + ["--steps", str(args.steps)], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    report = {"batch": args.batch, "length": args.length, "steps": args.steps, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("| variant | peak added by a step (MiB) | saved for backward (MiB) | step (s) |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['peak_increase_mib']:.0f} | {r['saved_for_backward_mib']:.0f} | "
            f"{r['step_seconds_median']:.2f} |"
        )


if __name__ == "__main__":
    main()
