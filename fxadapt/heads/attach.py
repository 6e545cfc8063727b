"""Put the active head(s) into one rewritten graph: the runtime's side of ``passes/heads.py``.

``HeadSetup`` is the hashable part of a graph's cache key that says which heads run, how they share
the batch (``multi.py``'s layout) and which label tensors the call gives. ``attach`` reads the base
model's output fields off the graph's flat outputs (through the capture's output spec), adds the
label inputs, calls ``passes.heads.attach_head`` per head and makes the graph return the head's
``ModelOutput``, or a ``MultiHeadOutput`` for several heads.

Several heads over blocks of one batch: under ``Parallel`` (the batch repeated once per channel by
the compose pass) head ``i`` reads channel ``i`` of the base outputs (``passes.heads.chunk_rows``)
and the call's own inputs and labels, which have one channel's rows; under a ``BatchSplit`` of heads
it reads its rows of everything (``slice_rows``). Their losses add up (``sum_of``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import TreeSpec

from passes.compose import repeat_batch
from passes.heads import (
    add_input,
    attach_head,
    chunk_rows,
    graph_inputs,
    graph_outputs,
    set_outputs,
    slice_rows,
    sum_of,
)

from ..errors import FxAdaptError
from . import multi, outputs
from .base import PredictionHead
from .outputs import MultiHeadOutput

Cut = Callable[[fx.Node], fx.Node]  # one head's rows of a node of the whole batch

# base inputs a head may read, by the name the call gives them
_READS = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class HeadSetup:
    """Which heads a graph runs and what the call gives them (part of the graph cache key)."""

    heads: tuple[str, ...]
    labels: tuple[tuple[str, str, int], ...] = ()  # (name, dtype, ndim) of each label tensor given
    as_tuple: bool = False  # the call asked for return_dict=False
    invertible: str | None = None  # the active invertible adapter module (LM heads run it reversed)
    layout: tuple = ()  # multi.py: () same outputs, PARALLEL per channel, ("rows", *sizes) per block

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.labels)


def base_nodes(
    graph: fx.Graph, input_names: tuple[str, ...], out_spec: TreeSpec
) -> tuple[dict[str, Any], dict[str, tuple[TreeSpec, list[Any]]]]:
    """(what a head reads: hidden states, pooled output, input ids, mask; every base output field)."""
    fields = outputs.base_fields(out_spec, graph_outputs(graph))
    if "last_hidden_state" not in fields:
        raise FxAdaptError(
            "flexible heads read the base model's last_hidden_state, but this model's output has "
            f"{sorted(fields) or out_spec.type}; wrap the model without a head (e.g. AutoModel)"
        )
    placeholders = dict(zip(input_names, graph_inputs(graph)))
    reads: dict[str, Any] = {name: placeholders.get(name) for name in _READS}
    reads["hidden_states"] = fields["last_hidden_state"][1][0]
    pooled = fields.get("pooler_output")
    reads["pooled_output"] = pooled[1][0] if pooled else None
    return reads, fields


def head_nodes(
    graph: fx.Graph,
    head: PredictionHead,
    target: str,
    reads: dict[str, Any],
    labels: dict[str, fx.Node],
    invertible: str | None = None,
) -> dict[str, fx.Node]:
    """One head's call on ``reads`` (nodes of one batch or one block of it); its output nodes by key."""
    if head.config.get("use_pooler") and reads.get("pooled_output") is None:
        raise FxAdaptError(
            f"head {head.name!r} has use_pooler=True, but the base model returns no pooler_output"
        )
    inputs = {k: reads.get(k) for k in ("hidden_states", "input_ids", "attention_mask")}
    if head.config.get("use_pooler"):
        inputs["pooled_output"] = reads["pooled_output"]
    if invertible is not None and head.output_embeddings() is not None:
        inputs["invertible"] = graph.get_attr(invertible)
    inputs.update(labels)
    given = set(labels) >= set(head.label_names)
    return attach_head(graph, target, inputs, head.keys(given), meta={"head_type": head.head_type})


def add_labels(graph: fx.Graph, setup: HeadSetup) -> dict[str, fx.Node]:
    return {name: add_input(graph, name) for name in setup.label_names}


def finish(
    graph: fx.Graph,
    per_head: list[tuple[PredictionHead, dict[str, fx.Node], Cut | None]],
    fields: dict[str, tuple[TreeSpec, list[Any]]],
    as_tuple: bool,
    loss: fx.Node | None = None,
) -> TreeSpec:
    """Make the graph return the head output(s); returns the spec that rebuilds them.

    One head: its ``ModelOutput`` class with the base fields it shares passed through (each head's
    ``cut`` of them: its rows). Several: ``MultiHeadOutput(head_outputs=[...], loss=loss)``.
    """
    seq2seq = "encoder_last_hidden_state" in fields
    pool = outputs.Leaves()
    objs = []
    for head, nodes, cut in per_head:
        cls = outputs.output_class(head.head_type, seq2seq)
        keep = {k: v for k, v in fields.items() if k in outputs.fields(cls) and k not in nodes}
        if cut is not None:
            keep = {
                k: (spec, [cut(x) if isinstance(x, fx.Node) else x for x in xs])
                for k, (spec, xs) in keep.items()
            }
        objs.append(outputs.structure(cls, nodes, keep, pool))
    if len(objs) == 1:
        result: Any = objs[0].to_tuple() if as_tuple else objs[0]
    else:
        result = MultiHeadOutput(head_outputs=objs, loss=pool.stand_in(loss) if loss is not None else None)
    leaves, spec = pool.flatten(result)
    set_outputs(graph, leaves)
    return spec


def attach(
    graph: fx.Graph,
    input_names: tuple[str, ...],
    out_spec: TreeSpec,
    heads: dict[str, PredictionHead],
    setup: HeadSetup,
) -> tuple[tuple[str, ...], TreeSpec]:
    """Run ``setup.heads`` at the end of ``graph`` (each on its block of rows); the new input names and spec."""
    reads, fields = base_nodes(graph, input_names, out_spec)
    labels = add_labels(graph, setup)
    per_head = []
    for name, cut in zip(setup.heads, _cuts(graph, setup.layout, len(setup.heads))):
        own_reads, own_labels = reads, labels
        if cut is not None:
            # the call's own inputs and labels have one channel's rows: only a row split cuts them
            ours = ("hidden_states", "pooled_output") if setup.layout == multi.PARALLEL else tuple(reads)
            own_reads = {k: cut(v) if k in ours and v is not None else v for k, v in reads.items()}
            if setup.layout != multi.PARALLEL:
                own_labels = {k: cut(v) for k, v in labels.items()}
        nodes = head_nodes(graph, heads[name], f"heads.{name}", own_reads, own_labels, setup.invertible)
        per_head.append((heads[name], nodes, cut))
    loss = None
    if setup.layout and all("loss" in nodes for _, nodes, _ in per_head):
        loss = sum_of(graph, [nodes["loss"] for _, nodes, _ in per_head])
    spec = finish(graph, per_head, fields, setup.as_tuple, loss)
    return tuple(input_names) + setup.label_names, spec


def _cuts(graph: fx.Graph, layout: tuple, n: int) -> list[Cut | None]:
    """Per head, what takes its rows of a node of the whole batch (None: it reads the whole batch)."""
    if not layout:
        return [None] * n
    if layout == multi.PARALLEL:
        if not any(node.op == "call_function" and node.target is repeat_batch for node in graph.nodes):
            raise FxAdaptError(
                "heads per Parallel channel, but this graph's batch is not repeated per channel (the active "
                "setup inserts nothing here); run one head, or set model.active_head = None"
            )
        chunks: dict[fx.Node, list[fx.Node]] = {}

        def channel(i: int) -> Cut:
            def cut(node: fx.Node) -> fx.Node:
                if node not in chunks:
                    chunks[node] = chunk_rows(graph, node, n)
                return chunks[node][i]

            return cut

        return [channel(i) for i in range(n)]
    bounds = list(itertools.accumulate(layout[1:], initial=0))

    def block(start: int, end: int) -> Cut:
        return lambda node: slice_rows(graph, node, start, end)

    return [block(bounds[i], bounds[i + 1]) for i in range(n)]


def label_signature(tensors: dict[str, torch.Tensor]) -> tuple[tuple[str, str, int], ...]:
    return tuple((k, str(t.dtype), t.dim()) for k, t in tensors.items())
