"""Prompt tuning: prepend trained embeddings to the hidden states entering the first layer.

The embedding site is the hidden state that enters the first layer of the first stack (what the
model's embedding block returns: BERT's after its LayerNorm and dropout, BART's encoder's after
``layernorm_embedding``, Llama's token embeddings), found from the nodes' ``nn_module_stack``. There
``h`` ``[B, S, H]`` becomes ``module(h)`` ``[B, P+S, H]``, and from there on the sequence is ``P+S``
long. The pass makes every shape downstream agree:

- at the graph's entry, ``P = prompt_embedding.weight.shape[0]`` and ``S' = S + P`` are computed once; the
  attention mask gets ``P`` ones in front (``labels`` with a sequence dim get ``P`` ignored positions,
  ``-100``), so the mask computation yields ``[B, 1, P+S, P+S]`` by itself;
- every node downstream of the prompt or of the extended mask that reads a value derived from ``S``
  (a ``sym_size``, an ``arange(S)`` for positions, a causal pattern) reads a copy computed from ``S'``
  instead. What only the embedding block reads (BERT's position ids) keeps ``S``, so the real tokens
  keep their positions as in AdapterHub; models that compute positions in the layers (rotary
  embeddings) number the prompt ``0..P-1`` and the tokens after it, as PEFT and AdapterHub do.

The module is called as ``module(h)`` and must expose ``prompt_embedding.weight`` (``[P, H]``).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .attention import attention_layers, find_attention
from .sites import Site

aten = torch.ops.aten

IGNORE_INDEX = -100


def prepend(x: torch.Tensor, length: int, value: int | float) -> torch.Tensor:
    """``length`` positions of ``value`` before ``x``'s sequence dim (dim 1)."""
    front = x.new_full((x.shape[0], length, *x.shape[2:]), value)
    return torch.cat([front, x], dim=1)


def _module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]


def _in_module(node: fx.Node, path: str) -> bool:
    return any(p == path or p.endswith("." + path) for p in _module_paths(node))


def _symbol(value) -> object | None:
    return value.node.expr if isinstance(value, torch.SymInt) else None


def embedding_site(graph: fx.Graph, sites: list[Site]) -> fx.Node:
    """The hidden states ``[B, S, H]`` entering the first layer of the first stack."""
    first = next((s for s in sites if s.layer is not None and s.roles), None)
    if first is None:
        raise ValueError("no layered projection site: cannot locate the embedding output")
    path = f"{first.stack}.{first.layer}"
    hidden = first.in_features
    inside = [n for n in graph.nodes if n.op == "call_function" and _in_module(n, path)]
    members = set(inside)
    for node in inside:
        for arg in node.all_input_nodes:
            val = arg.meta.get("val")
            if arg in members or not isinstance(val, torch.Tensor) or not val.is_floating_point():
                continue
            if val.dim() == 3 and val.shape[-1] == hidden and _symbol(val.shape[1]) is not None:
                return arg
    raise ValueError(
        f"no hidden states [batch, seq, {hidden}] enter {path}: cannot locate the embedding output"
    )


def _placeholder(graph: fx.Graph, name: str) -> fx.Node | None:
    """The input named ``name`` (captured as ``tensors_<name>``; not ``decoder_<name>``)."""
    hits = [
        n
        for n in graph.nodes
        if n.op == "placeholder" and (n.target == name or str(n.target).endswith("_" + name))
    ]
    return min(hits, key=lambda n: len(str(n.target)), default=None)


def _seq_symbol_nodes(graph: fx.Graph, symbol: object) -> list[fx.Node]:
    """Nodes that compute the sequence length itself (``sym_size`` of a token input, say)."""
    return [
        n
        for n in graph.nodes
        if n.op == "call_function" and n.target is aten.sym_size.int and _symbol(n.meta.get("val")) == symbol
    ]


def insert_prompt(graph: fx.Graph, sites: list[Site], targets: dict[str, str]) -> list[fx.Node]:
    """Prepend the prompt module's output at the embedding site and re-derive every downstream length."""
    if len(targets) != 1:
        raise KeyError(f"prompt tuning has one module, got {sorted(targets)}")
    ((key, target),) = targets.items()
    h = embedding_site(graph, sites)
    symbol = _symbol(h.meta["val"].shape[1])
    seq_nodes = _seq_symbol_nodes(graph, symbol)
    entry = seq_nodes[0] if seq_nodes else [n for n in graph.nodes if n.op == "placeholder"][-1]
    added: list[fx.Node] = []

    with graph.inserting_after(entry):
        weight = graph.get_attr(f"{target}.prompt_embedding.weight")
    with graph.inserting_after(weight):
        length = graph.call_function(aten.sym_size.int, (weight, 0))
    added += [weight, length]
    new_seq = None
    if seq_nodes:
        with graph.inserting_after(length):
            new_seq = graph.call_function(operator.add, (seq_nodes[0], length))
        added.append(new_seq)
    last = new_seq or length

    # A decoder-only or encoder-only model's token labels follow the input (export may give them a
    # length symbol of their own); an encoder-decoder's labels are the decoder's and stay as they are.
    decoder = any(layer.location == "cross" for layer in attention_layers(sites))
    for att in find_attention(graph, sites) if decoder else []:
        val = att.q.meta.get("val")
        if att.cross and isinstance(val, torch.Tensor) and _symbol(val.shape[-2]) == symbol:
            raise ValueError(
                "the decoder's length is the encoder input's (decoder inputs derived from input_ids); "
                "prompt tuning lengthens only the encoder's: pass decoder_input_ids or labels"
            )
    sources: list[fx.Node] = []
    for name, value in (("attention_mask", 1), ("labels", IGNORE_INDEX)):
        ph = _placeholder(graph, name)
        val = ph.meta.get("val") if ph is not None else None
        if ph is None or not isinstance(val, torch.Tensor) or val.dim() < 2:
            continue
        if _symbol(val.shape[1]) != symbol and (name != "labels" or decoder):
            continue
        with graph.inserting_after(last):
            extended = graph.call_function(prepend, (ph, length, value))
        ph.replace_all_uses_with(extended, delete_user_cb=lambda user, new=extended: user is not new)
        sources.append(extended)
        added.append(extended)
        last = extended

    with graph.inserting_after(h):
        prompted = graph.call_module(target, (h,))
    h.replace_all_uses_with(prompted, delete_user_cb=lambda user: user is not prompted)
    prompted.meta["fxadapt"] = {"adapter": target, "site": key}
    added.append(prompted)
    sources.append(prompted)

    _rederive_lengths(graph, sources, set(seq_nodes), new_seq, symbol)
    return added


def _rederive_lengths(
    graph: fx.Graph, sources: list[fx.Node], seq_nodes: set[fx.Node], new_seq: fx.Node | None, symbol
) -> None:
    """Make every node downstream of ``sources`` read lengths derived from ``new_seq`` instead of ``S``."""
    downstream: set[fx.Node] = set()
    stack = list(sources)
    while stack:
        node = stack.pop()
        for user in node.users:
            if user not in downstream:
                downstream.add(user)
                stack.append(user)

    depends: dict[fx.Node, bool] = {}

    def uses_seq(node: fx.Node) -> bool:
        if node in depends:
            return depends[node]
        todo, order = [node], []
        while todo:
            n = todo.pop()
            if n in depends or n in order:
                continue
            order.append(n)
            if n not in seq_nodes and n.op == "call_function":
                todo.extend(a for a in n.all_input_nodes if a not in depends)
        for n in reversed(order):
            if n in seq_nodes:
                depends[n] = True
            elif n.op != "call_function" or n in downstream:
                depends[n] = False
            else:
                depends[n] = any(depends.get(a, False) for a in n.all_input_nodes)
        return depends[node]

    copies: dict[fx.Node, fx.Node] = {}

    def copy(node: fx.Node) -> fx.Node:
        if node in seq_nodes:
            return new_seq
        if node not in copies:
            new = graph.node_copy(node, lambda a: copy(a) if uses_seq(a) else a)
            new.meta = dict(node.meta)
            copies[node] = new
        return copies[node]

    for node in [n for n in graph.nodes if n in downstream]:
        for arg in node.all_input_nodes:
            if arg in downstream or arg in copies.values():
                continue
            if uses_seq(arg):
                if new_seq is None:
                    raise ValueError(
                        f"{arg.name} depends on the sequence length but the graph has no size node"
                    )
                with graph.inserting_before(node):
                    node.replace_input_with(arg, copy(arg))
            elif node.op != "output" and _has_symbol(arg, symbol):
                raise ValueError(
                    f"prompt tuning cannot lengthen {arg.format_node()}: it has the input's sequence length "
                    f"and {node.name} downstream of the prompt reads it"
                )


def _has_symbol(node: fx.Node, symbol) -> bool:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return False
    return any(_symbol(d) is not None and symbol in _symbol(d).free_symbols for d in val.shape)
