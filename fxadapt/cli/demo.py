"""``fxadapt demo``: LoRA on a tiny BERT, end to end, on a task it can learn in a minute.

The base model is a ``BertForSequenceClassification`` built from a config (random init, nothing is
downloaded). The task: does the sequence contain the marker token? Sequences have random lengths
and are right-padded, so the attention mask matters. The LoRA matrices and the model's task head
(``classifier``, as ``train_adapter`` trains it by default) train; the rest of the base model, its
pooler included, stays frozen.

The demo prints the site table, the nodes the LoRA pass inserted into the graph, the trainable
parameters, a progress bar over (compiled) training, accuracy on a held-out set before and after,
the merged-vs-unmerged check and the saved adapter's size on disk. ``run()`` returns the numbers.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import fx

PAD, CLS, MARKER, FIRST_TOKEN = 0, 2, 7, 10
ADAPTER = "marker"


@dataclass(frozen=True)
class Setting:
    """Model and task sizes for one variant of the demo."""

    hidden: int
    layers: int
    heads: int
    vocab: int
    seq_len: int
    train_size: int
    test_size: int
    batch: int
    steps: int
    lr: float


FULL = Setting(
    hidden=64,
    layers=2,
    heads=4,
    vocab=100,
    seq_len=16,
    train_size=4096,
    test_size=512,
    batch=32,
    steps=200,
    lr=3e-3,
)
QUICK = Setting(
    hidden=32,
    layers=2,
    heads=2,
    vocab=64,
    seq_len=12,
    train_size=1024,
    test_size=256,
    batch=32,
    steps=60,
    lr=5e-3,
)


def lora_config():
    """LoRA on q, k, v and both FFN projections: AdapterHub's option names, r=8, alpha=16."""
    from ..methods.lora import LoRAConfig

    return LoRAConfig(r=8, alpha=16, attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True)


def build_model(s: Setting):
    """A randomly initialised BertForSequenceClassification (2 labels) from a config."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        intermediate_size=2 * s.hidden,
        max_position_embeddings=max(64, s.seq_len),
        num_labels=2,
        pad_token_id=PAD,
    )
    return BertForSequenceClassification(cfg)


def make_data(n: int, s: Setting, g: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` right-padded sequences; label 1 iff the marker token occurs (half of them)."""
    L = s.seq_len
    ids = torch.randint(FIRST_TOKEN, s.vocab, (n, L), generator=g)
    ids[:, 0] = CLS
    lengths = torch.randint(L // 2, L + 1, (n,), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    pos = 1 + (torch.rand(n, generator=g) * (lengths - 1)).long()
    rows = labels.nonzero().squeeze(1)
    ids[rows, pos[rows]] = MARKER
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, PAD)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def accuracy(model: Any, data: dict[str, torch.Tensor], batch: int = 128) -> float:
    """Share of correct argmax predictions, in eval mode (restores the previous mode)."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data["labels"]), batch):
            out = model(
                input_ids=data["input_ids"][i : i + batch],
                attention_mask=data["attention_mask"][i : i + batch],
            )
            correct += (out.logits.argmax(-1) == data["labels"][i : i + batch]).sum().item()
    model.train(was_training)
    return correct / len(data["labels"])


def logits(model: Any, data: dict[str, torch.Tensor], batch: int = 128) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [
                model(
                    input_ids=data["input_ids"][i : i + batch],
                    attention_mask=data["attention_mask"][i : i + batch],
                ).logits
                for i in range(0, len(data["labels"]), batch)
            ]
        )


def _line(gm: fx.GraphModule, name: str) -> str:
    """The generated-code line that computes node ``name``, without FX's ``x = None`` cleanups."""
    for line in gm.code.splitlines():
        if line.startswith(f"    {name} = "):
            return line.strip().split(";  ")[0]
    return f"{name} = ?"


def graph_diff(base: fx.GraphModule, adapted: fx.GraphModule) -> dict[str, Any]:
    """Nodes of ``adapted`` that ``base`` lacks (node names are kept by the rewrite), with their sites."""
    before = {n.name for n in base.graph.nodes}
    added = [n for n in adapted.graph.nodes if n.name not in before]
    removed = sorted(before - {n.name for n in adapted.graph.nodes})
    inserted = [
        {
            "node": n.name,
            "op": n.op,
            "target": str(n.target),
            "site": n.meta.get("fxadapt", {}).get("site"),
            "args": [str(a) for a in n.args],
        }
        for n in added
    ]
    return {
        "base_nodes": len(base.graph.nodes),
        "adapted_nodes": len(adapted.graph.nodes),
        "inserted": inserted,
        "removed": removed,
    }


def excerpt(base: fx.GraphModule, adapted: fx.GraphModule, site_node: str) -> tuple[list[str], list[str]]:
    """Code around one projection: the projection and its reader, before and after the rewrite."""

    def around(gm: fx.GraphModule) -> list[str]:
        node = next(n for n in gm.graph.nodes if n.name == site_node)
        chain = [node]
        while len(chain) < 4 and len(chain[-1].users) == 1:
            nxt = next(iter(chain[-1].users))
            if nxt.op == "output":
                break
            chain.append(nxt)
            if nxt.op == "call_function" and "view" in str(nxt.target):
                break
        return [_line(gm, n.name) for n in chain]

    return around(base), around(adapted)


def _dir_size(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


def run(
    steps: int | None = None,
    compile: bool = True,
    quick: bool = False,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    stream: TextIO | None = None,
    progress: bool = True,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Run the demo, printing to ``stream`` (stdout); returns the measured numbers as a dict.

    ``threads``: intra-op CPU threads while the demo runs (restored afterwards); ``None`` keeps
    torch's setting. One thread is the fastest for a model this small, and several threads on a
    busy machine can be many times slower.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(steps, compile, quick, out, seed, stream, progress)
    finally:
        torch.set_num_threads(previous)


def _run(
    steps: int | None,
    compile: bool,
    quick: bool,
    out: str | os.PathLike | None,
    seed: int,
    stream: TextIO | None,
    progress: bool,
) -> dict[str, Any]:
    import fxadapt

    stream = stream or sys.stdout
    s = QUICK if quick else FULL
    steps = s.steps if steps is None else steps
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def say(*lines: str) -> None:
        for line in lines:
            print(line, file=stream)
        stream.flush()

    def section(title: str) -> None:
        say("", f"== {title} " + "=" * max(3, 76 - len(title)))

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    train = make_data(s.train_size, s, g)
    test = make_data(s.test_size, s, g)
    hf = build_model(s)

    section("Setup")
    say(
        f"base model : BertForSequenceClassification, random init from a config "
        f"(hidden {s.hidden}, {s.layers} layers, {s.heads} heads, vocab {s.vocab})",
        f"task       : label = 1 iff token {MARKER} occurs in the sequence; lengths {s.seq_len // 2}-"
        f"{s.seq_len}, right-padded",
        f"data       : {s.train_size} train / {s.test_size} held-out test sequences, seed {seed}",
        f"adapter    : {lora_config()}",
        f"training   : {steps} steps, batch {s.batch}, AdamW lr {s.lr}, "
        f"{'torch.compile' if compile else 'eager GraphModule (no compile)'}, "
        f"{torch.get_num_threads()} CPU thread(s)",
        "trainable  : the LoRA matrices and the classifier head (train_adapter's train_head=True); "
        "the rest of the base model, its pooler included, stays frozen",
    )

    t = time.perf_counter()
    model = fxadapt.adapt(hf, lora_config(), name=ADAPTER, compile=compile)
    timings["capture_and_add"] = time.perf_counter() - t

    section("Sites (model.sites())")
    sites = model.sites()
    adapted_keys = set(model.adapters[ADAPTER].site_keys)
    say(str(sites), "", f"{len(adapted_keys)} of {len(sites)} sites get a LoRA module")

    section("Rewritten graph: nodes added by the LoRA pass")
    model.set_active_adapters(None)
    base_gm = model.graph_module
    model.set_active_adapters(ADAPTER)
    lora_gm = model.graph_module
    diff = graph_diff(base_gm, lora_gm)
    say(
        f"graph without adapter: {diff['base_nodes']} nodes; with {ADAPTER!r}: {diff['adapted_nodes']} nodes "
        f"(+{len(diff['inserted'])}, -{len(diff['removed'])})"
    )
    by_key = sites.by_key()
    for d in diff["inserted"]:
        site = by_key.get(d["site"])
        layer = "-" if site is None or site.layer is None else site.layer
        role = "+".join(site.roles) if site is not None else "-"
        say(f"  + {d['op']:11} layer {layer:>2} {role:7} {d['site']:45} ({', '.join(d['args'])})")
    first = next(x for x in sites if x.key in adapted_keys)
    before, after = excerpt(base_gm, lora_gm, first.node)
    say(
        "",
        f"code for {first.key} ({first.node}), before:",
        *("    " + line for line in before),
        "after:",
        *("    " + line for line in after),
    )

    section("Trainable parameters (model.adapter_summary())")
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_base = sum(p.numel() for p in model.base.parameters())
    say(
        model.adapter_summary(),
        f"optimizer gets {len(trainable)} tensors, {n_trainable:,} parameters "
        f"({100 * n_trainable / n_base:.2f}% of the base model's {n_base:,})",
    )

    section("Accuracy before training (held-out, eval graph)")
    t = time.perf_counter()
    acc_before = accuracy(model, test)
    timings["eval_before"] = time.perf_counter() - t
    say(
        f"accuracy: {acc_before:.1%}  ({timings['eval_before']:.1f} s"
        f"{', includes compiling the eval graph' if compile else ''})"
    )

    section(f"Training ({'compiled' if compile else 'eager'})")
    opt = torch.optim.AdamW(trainable, lr=s.lr)
    model.train()
    if compile:
        say("the first step captures the training graph (with labels) and compiles it; later steps reuse it")
    from tqdm.auto import tqdm

    bar = tqdm(
        range(steps), desc="train", unit="step", disable=not progress, file=sys.stderr, dynamic_ncols=True
    )
    losses = []
    t = time.perf_counter()
    first_step = 0.0
    for step in bar:
        idx = torch.randint(0, s.train_size, (s.batch,), generator=g)
        loss = model(**{k: v[idx] for k, v in train.items()}).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 0:
            first_step = time.perf_counter() - t
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    timings["train"] = time.perf_counter() - t
    rest = (timings["train"] - first_step) / max(1, steps - 1)
    say(
        f"{steps} steps in {timings['train']:.1f} s: first step {first_step:.1f} s"
        f"{' (capture + compile)' if compile else ' (capture)'}, then {1000 * rest:.0f} ms/step"
    )
    if losses:
        say(
            f"loss: first 10 steps {sum(losses[:10]) / len(losses[:10]):.3f} -> "
            f"last 10 steps {sum(losses[-10:]) / len(losses[-10:]):.3f}"
        )

    section("Accuracy after training")
    t = time.perf_counter()
    acc_after = accuracy(model, test)
    timings["eval_after"] = time.perf_counter() - t
    say(f"accuracy: {acc_before:.1%} -> {acc_after:.1%}")

    section("Merge check: merge_adapter() vs the unmerged graph")
    weight = model.sites().by_key()[first.key].weight
    original = model.get_parameter(weight).detach().clone()
    t = time.perf_counter()
    unmerged = logits(model, test)
    model.merge_adapter(ADAPTER)
    merged = logits(model, test)
    merged_nodes = sum(1 for n in model.graph_module.graph.nodes if n.op == "call_module")
    model.reset_adapter()
    restored = logits(model, test)
    timings["merge_check"] = time.perf_counter() - t
    merge_diff = (merged - unmerged).abs().max().item()
    reset_diff = (restored - unmerged).abs().max().item()
    weight_exact = torch.equal(model.get_parameter(weight), original)
    say(
        f"merged graph has {merged_nodes} adapter nodes (the update lives in the base weights)",
        f"max |merged - unmerged| logits : {merge_diff:.2e}",
        f"max |reset  - unmerged| logits : {reset_diff:.2e}",
        f"reset_adapter() restored {weight} exactly: {weight_exact}",
        f"({timings['merge_check']:.1f} s{', includes compiling the merged eval graph' if compile else ''})",
    )

    section("Saved adapter (model.save_adapter())")
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="fxadapt-demo-")
        path = Path(tmp.name) / ADAPTER
    else:
        path = Path(out)
    try:
        model.save_adapter(path, ADAPTER)
        sizes = _dir_size(path)
        for name, size in sizes.items():
            say(f"  {path / name}  {size:,} bytes")
        total = sum(sizes.values())
        say(
            f"total {total:,} bytes ({total / 1024:.1f} KiB) vs base model weights "
            f"{4 * n_base:,} bytes (float32)"
        )
        loaded = model.load_adapter(path, load_as="reloaded")
        same = all(
            torch.equal(a, b)
            for a, b in zip(
                model.adapters[ADAPTER].state_dict().values(), model.adapters[loaded].state_dict().values()
            )
        )
        model.delete_adapter(loaded)
        say(f"load_adapter() round trip: tensors identical: {same}")
        saved_files = {name: str(path / name) for name in sizes}
    finally:
        if tmp is not None:
            tmp.cleanup()
    if tmp is not None:
        say("(written to a temporary folder, now removed; pass --out DIR to keep it)")

    total_s = time.perf_counter() - t_start
    section("Summary")
    say(
        f"accuracy {acc_before:.1%} -> {acc_after:.1%} with {n_trainable:,} trainable parameters; "
        f"merge diff {merge_diff:.1e}; adapter {total / 1024:.1f} KiB; {total_s:.0f} s in all"
    )
    return {
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "merge_max_abs_diff": merge_diff,
        "reset_max_abs_diff": reset_diff,
        "reset_exact": weight_exact,
        "reload_identical": same,
        "trainable_params": n_trainable,
        "base_params": n_base,
        "inserted_nodes": diff["inserted"],
        "sites": len(sites),
        "adapter_dir": str(path) if tmp is None else None,
        "adapter_files": saved_files if tmp is None else {},
        "adapter_sizes": sizes,
        "adapter_bytes": total,
        "losses": losses,
        "steps": steps,
        "compiled": compile,
        "timings": {**timings, "total": total_s},
    }
