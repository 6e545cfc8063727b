"""Generation benchmark: fxadapt's compiled generate() against PEFT's and the plain model's generate().

For a Llama 4L/512 (vocab 32000) and a GPT-2-small-sized model, batch 1 and 8, a 32-token prompt and
128 new tokens (``min_new_tokens=128``, so that every variant generates them all), greedy:

* ``fx_unmerged``: ``fxadapt.adapt(model, LoRAConfig(r=8, alpha=16))`` (compiled), ``generate``;
* ``fx_merged``: the same after ``merge_adapter``;
* ``peft``: PEFT's LoRA with the same r and targets, ``generate`` (dynamic cache, eager);
* ``plain``: the plain HF model's ``generate`` (dynamic cache, eager);
* ``plain_static_compiled``: the plain HF model's ``generate`` with ``cache_implementation="static"`` and
  its decode step under ``torch.compile`` (transformers' own recipe, ``compile_config``).

Time to first token (TTFT) is when ``generate`` hands the first new token to a streamer; tokens/s is
batch x 128 over the whole call. Variants are warmed up (compiling included), then timed round-robin;
the figures are medians. The load average is recorded before and after. Run
``python benchmarks/bench_generate.py --help``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.generation.configuration_utils import CompileConfig  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

import fxadapt  # noqa: E402

VARIANTS = ("fx_unmerged", "fx_merged", "peft", "plain", "plain_static_compiled")
LABELS = {
    "fx_unmerged": "fxadapt LoRA unmerged (compiled)",
    "fx_merged": "fxadapt LoRA merged (compiled)",
    "peft": "PEFT LoRA generate (eager)",
    "plain": "plain model generate (dynamic cache, eager)",
    "plain_static_compiled": "plain model, static cache + torch.compile",
}
TITLES = {"llama": "Llama 4L/512 (vocab 32000)", "gpt2": "GPT-2 small (12L/768, vocab 50257)"}
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
R, ALPHA = 8, 16


def build(name: str, quick: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        cfg = dict(
            hidden_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            intermediate_size=1376,
            vocab_size=32000,
        )
        if quick:
            cfg.update(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                vocab_size=1000,
            )
        return LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    cfg = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000) if quick else {}
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def variants(base: torch.nn.Module, name: str) -> dict[str, Any]:
    """Each variant: a ``generate``-like callable on its own copy of the weights."""
    from peft import LoraConfig, get_peft_model

    lora = fxadapt.LoRAConfig(
        r=R, alpha=ALPHA, init_weights="bert"
    )  # a non-zero B: the adapter changes outputs
    unmerged = fxadapt.adapt(copy.deepcopy(base), lora, name="lora").eval()
    merged = fxadapt.adapt(copy.deepcopy(base), lora, name="lora").eval()
    merged.adapters.load_state_dict(unmerged.adapters.state_dict())
    merged.merge_adapter("lora")
    peft = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS[name], init_lora_weights=False),
    ).eval()
    plain = copy.deepcopy(base)
    static = copy.deepcopy(base)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on CPU only when asked this way

    def static_generate(**kw: Any) -> Any:
        return static.generate(**kw, cache_implementation="static", compile_config=compile_config)

    return {
        "fx_unmerged": unmerged.generate,
        "fx_merged": merged.generate,
        "peft": peft.generate,
        "plain": plain.generate,
        "plain_static_compiled": static_generate,
    }


class FirstToken(BaseStreamer):
    """Records when ``generate`` hands over the first new token (its first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.first = 0, None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run(fn: Any, inputs: dict[str, torch.Tensor], new: int) -> dict[str, float]:
    streamer = FirstToken()
    cpu0, t0 = time.process_time(), time.perf_counter()
    with torch.no_grad():
        out = fn(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=streamer)
    total = time.perf_counter() - t0
    assert out.shape[1] == inputs["input_ids"].shape[1] + new
    return {
        "total_s": total,
        "ttft_s": streamer.first - t0,
        "tokens_per_s": out.shape[0] * new / total,
        "cpu_per_wall": (time.process_time() - cpu0) / total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama,gpt2")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny models, 8 new tokens, 2 rounds: a smoke run")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    if args.quick:
        args.new, args.rounds = 8, 2
    batches = [int(b) for b in args.batches.split(",")]
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "load_before": os.getloadavg(),
        "prompt": args.prompt,
        "new_tokens": args.new,
        "rounds": args.rounds,
        "quick": args.quick,
    }
    results: dict[str, Any] = {"meta": meta, "models": {}}
    for name in args.models.split(","):
        base = build(name, args.quick)
        fns = variants(base, name)
        vocab = base.config.vocab_size
        per: dict[str, Any] = {}
        for b in batches:
            g = torch.Generator().manual_seed(b)
            inputs = {"input_ids": torch.randint(3, vocab, (b, args.prompt), generator=g)}
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            warm = {}
            for v in tqdm(VARIANTS, desc=f"{name} b={b} warm-up"):
                t0 = time.perf_counter()
                run(fns[v], inputs, args.new)  # compiles (first batch size) or checks no recompile
                warm[v] = time.perf_counter() - t0
                run(fns[v], inputs, args.new)
            samples: dict[str, list] = {v: [] for v in VARIANTS}
            for _ in tqdm(range(args.rounds), desc=f"{name} b={b} rounds"):
                for v in VARIANTS:
                    samples[v].append(run(fns[v], inputs, args.new))
            per[str(b)] = {"first_call_s": warm, "samples": samples}
        results["models"][name] = per
    meta["load_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (out / f"bench_generate{suffix}.json").write_text(json.dumps(results, indent=1))
    report = render(results)
    (out / f"bench_generate{suffix}.md").write_text(report)
    print(report)


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"# Generation benchmark ({meta['date']})",
        "",
        f"{meta['machine']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['threads']} threads; "
        f"prompt {meta['prompt']}, {meta['new_tokens']} new tokens, greedy, medians of {meta['rounds']} rounds; "
        f"load average before {meta['load_before'][0]:.2f}, after {meta['load_after'][0]:.2f}.",
        "",
    ]
    for name, per in results["models"].items():
        lines += [f"## {TITLES.get(name, name)}", ""]
        lines += [
            "| variant | batch | TTFT ms | tokens/s | vs PEFT | vs static+compile | CPU/wall | first call s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for b, data in per.items():
            med = {
                v: {k: statistics.median(s[k] for s in data["samples"][v]) for k in data["samples"][v][0]}
                for v in VARIANTS
            }
            for v in VARIANTS:
                m = med[v]
                lines.append(
                    f"| {LABELS[v]} | {b} | {m['ttft_s'] * 1e3:.0f} | {m['tokens_per_s']:.1f} | "
                    f"{m['tokens_per_s'] / med['peft']['tokens_per_s']:.2f}x | "
                    f"{m['tokens_per_s'] / med['plain_static_compiled']['tokens_per_s']:.2f}x | "
                    f"{m['cpu_per_wall']:.2f} | {data['first_call_s'][v]:.1f} |"
                )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
