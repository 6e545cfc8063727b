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

The module is called as ``module(h)`` and must expose ``prompt_embedding.weight`` (``[P, H]``). Under
the key ``INPUT_EMBEDDINGS`` it goes instead where PEFT puts its prompt: right after the input-embedding
module on the token ids (``word_embeddings``), so the prompt then passes the embedding block and
takes positions ``0..P-1`` (the same re-derivation makes the position ids ``0..P+S-1``).

The target may be a row split (``BatchSplit``, ``Parallel``; ``passes.compose``): each block of
rows gets its own prompt, and every row is ``P_max + S`` long (``P_max``, the longest prompt of the
split). A row is its adapter's own output ``[P_i + S]`` left-padded with ``P_max - P_i`` zero
positions (a block without a prompt gets ``P_max``), and the attention mask is 0 there, so the real
positions of every row sit at ``P_max - P_i ..`` and its tokens end the row. Masking needs the
call's ``attention_mask``: without one, a row split is refused.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from .attention import attention_layers, find_attention
from .compose import Leaf, Plan, cat_rows, graph_input, rows_of, split_rows
from .fixed_length import check_fixed_length, fixed_sizes, has_length, lengthen_sizes
from .sites import Site

aten = torch.ops.aten

IGNORE_INDEX = -100
# the prompt module's key when it goes before the embedding block (PEFT's placement), not after it
INPUT_EMBEDDINGS = "input_embeddings"


def prepend(x: torch.Tensor, length: int, value: int | float) -> torch.Tensor:
    """``length`` positions of ``value`` before ``x``'s sequence dim (dim 1)."""
    front = x.new_full((x.shape[0], length, *x.shape[2:]), value)
    return torch.cat([front, x], dim=1)


def longest_prompt(*weights: torch.Tensor) -> int:
    """``P_max``: the length of the longest prompt (``[P_i, H]`` each)."""
    return max(w.shape[0] for w in weights)


def pad_front(x: torch.Tensor, weight: torch.Tensor | None, longest: int) -> torch.Tensor:
    """A row block's output with ``P_max - P_i`` zero positions in front (``P_i`` 0 for no prompt)."""
    n = longest - (weight.shape[0] if weight is not None else 0)
    return prepend(x, n, 0) if n else x


def prompt_mask(mask: torch.Tensor, weight: torch.Tensor | None, longest: int) -> torch.Tensor:
    """A row block's attention mask: ``P_max - P_i`` zeros, ``P_i`` ones, then the mask."""
    n = weight.shape[0] if weight is not None else 0
    return pad_front(prepend(mask, n, 1), weight, longest)


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
    static = None  # a vision model's patch sequence has a fixed length: taken if nothing is symbolic
    for node in inside:
        for arg in node.all_input_nodes:
            val = arg.meta.get("val")
            if arg in members or not isinstance(val, torch.Tensor) or not val.is_floating_point():
                continue
            if val.dim() == 3 and val.shape[-1] == hidden and _symbol(val.shape[1]) is not None:
                return _before_projection(arg, sites)
            if val.dim() == 3 and val.shape[-1] == hidden and static is None:
                static = arg
    if static is not None:
        return _before_projection(static, sites)
    raise ValueError(
        f"no hidden states [batch, seq, {hidden}] enter {path}: cannot locate the embedding output"
    )


def _before_projection(node: fx.Node, sites: list[Site]) -> fx.Node:
    """The embedding block's own output when a projection outside the layers maps it to the hidden
    size (ALBERT's ``embedding_hidden_mapping_in``, ELECTRA's ``embeddings_project``): the prompt has
    the embedding size there, as in AdapterHub, which prepends it to the embedding block's output."""
    site = embedding_projection(sites)
    if site is None or node.name != site.node or node.target is not aten.linear.default:
        return node
    return node.args[0]


def embedding_projection(sites: list[Site]) -> Site | None:
    """The projection outside the layers, right before the first layer, from embedding to hidden size."""
    sites = list(sites)
    first = next((i for i, s in enumerate(sites) if s.layer is not None and s.roles), None)
    if not first:
        return None
    site = sites[first - 1]
    wide = site.out_features == sites[first].in_features != site.in_features
    return site if site.layer is None and not site.roles and wide else None


def word_embeddings(graph: fx.Graph) -> fx.Node:
    """The output of the input-embedding module (``get_input_embeddings()``) on the token ids.

    PEFT prepends its prompt there (the model's ``inputs_embeds``), before position embeddings, an
    embedding norm or scale. The module's output is its last node (BART's scaled embedding included).
    """
    lookup = next(
        (
            n
            for n in graph.nodes
            if n.op == "call_function" and n.target is aten.embedding.default and _reads_input(n.args[1])
        ),
        None,
    )
    if lookup is None:
        raise ValueError("no embedding lookup of the token ids: cannot locate the input embeddings")
    paths = _module_paths(lookup)
    node = lookup
    while paths:
        nxt = [u for u in node.users if u.op == "call_function" and paths[-1] in _module_paths(u)]
        if len(nxt) != 1:
            break
        node = nxt[0]
    return node


def _reads_input(node: object) -> bool:
    while isinstance(node, fx.Node) and node.op == "call_function" and "view" in str(node.target):
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op == "placeholder"


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


def insert_prompt(graph: fx.Graph, sites: list[Site], targets: dict[str, Any]) -> list[fx.Node]:
    """Prepend the prompt module's output at the embedding site and re-derive every downstream length."""
    if len(targets) != 1:
        raise KeyError(f"prompt tuning has one module, got {sorted(targets)}")
    ((key, target),) = targets.items()
    tree = Leaf(target) if isinstance(target, str) else target
    h = word_embeddings(graph) if key == INPUT_EMBEDDINGS else embedding_site(graph, sites)
    symbol = _symbol(h.meta["val"].shape[1])
    fixed = None if symbol is not None else int(h.meta["val"].shape[1])  # S when it is not a symbol
    seq_nodes = _seq_symbol_nodes(graph, symbol) if fixed is None else []
    if fixed is not None:
        check_fixed_length(fixed, sites)
    entry = seq_nodes[0] if seq_nodes else [n for n in graph.nodes if n.op == "placeholder"][-1]
    inputs = {name: _placeholder(graph, name) for name in ("attention_mask", "labels")}
    # after Parallel's repeated inputs, and the batch size node a row split reads
    batch = [tree.batch] if isinstance(tree, Plan) else []
    entry = _latest(graph, [entry, *batch, *[graph_input(n) for n in inputs.values() if n is not None]])
    before = set(graph.nodes)

    leaves = list({leaf.target: leaf for leaf in ([tree] if isinstance(tree, Leaf) else tree.leaves())})
    with graph.inserting_before(entry.next):
        weights = {t: graph.get_attr(f"{t}.prompt_embedding.weight") for t in leaves}
        if isinstance(tree, Leaf):
            length = graph.call_function(aten.sym_size.int, (weights[tree.target], 0))
        else:
            length = graph.call_function(longest_prompt, tuple(weights.values()))
        new_seq = graph.call_function(operator.add, (seq_nodes[0], length)) if seq_nodes else None
        if fixed is not None:
            new_seq = graph.call_function(operator.add, (fixed, length))
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
    # the embedding block itself runs on the S real tokens (DeBERTa multiplies its output by the mask)
    upstream = _ancestors(h)
    sources: list[fx.Node] = []
    masked = False
    for name, value in (("attention_mask", 1), ("labels", IGNORE_INDEX)):
        ph = inputs[name]
        val = ph.meta.get("val") if ph is not None else None
        if ph is None or not isinstance(val, torch.Tensor) or val.dim() < 2:
            continue
        if _symbol(val.shape[1]) != symbol and (name != "labels" or decoder):
            continue
        src = graph_input(ph)
        made = set(graph.nodes)
        with graph.inserting_before(last.next):
            if name == "attention_mask" and isinstance(tree, Plan):

                def block_mask(m: fx.Node, t: str | None) -> fx.Node:
                    return graph.call_function(prompt_mask, (m, weights.get(t), length))

                extended = _rows(graph, tree, src, None, block_mask)
                masked = True
            else:
                extended = graph.call_function(prepend, (src, length, value))
        made = set(graph.nodes) - made
        src.replace_all_uses_with(extended, delete_user_cb=lambda user, new=made: user not in new | upstream)
        sources.append(extended)
        last = extended
    if isinstance(tree, Plan) and not masked:
        raise ValueError(
            "prompt tuning inside BatchSplit/Parallel pads the rows of shorter (or no) prompts with masked "
            "positions, which needs the call's attention_mask: pass attention_mask (all ones if no token "
            "is padding)"
        )

    made = set(graph.nodes)

    def block_hidden(x: fx.Node, t: str | None) -> fx.Node:
        out = x if t is None else _prompt(graph, t, x, key)
        return graph.call_function(pad_front, (out, weights.get(t), length))

    with graph.inserting_before(h.next):
        prompted = (
            _prompt(graph, tree.target, h, key)
            if isinstance(tree, Leaf)
            else _rows(graph, tree, h, None, block_hidden)
        )
    made = set(graph.nodes) - made
    h.replace_all_uses_with(prompted, delete_user_cb=lambda user: user not in made)
    sources.append(prompted)

    _rederive_lengths(graph, sources, set(seq_nodes), new_seq, symbol, fixed)
    return [n for n in graph.nodes if n not in before]


def _prompt(graph: fx.Graph, target: str, x: fx.Node, key: str) -> fx.Node:
    node = graph.call_module(target, (x,))
    node.meta["fxadapt"] = {"adapter": target, "site": key}
    return node


def _rows(
    graph: fx.Graph, tree: Plan, x: fx.Node, batch: Any, block: Callable[[fx.Node, str | None], fx.Node]
) -> fx.Node:
    """``x`` split into the row blocks of ``tree``, each through ``block(rows, prompt target or None)``."""
    if tree.kind != "rows":
        raise ValueError(
            f"prompt tuning composes with BatchSplit and Parallel only, not {tree.kind}: the prompt is one "
            "sequence in front of the input, which another prompt cannot also be"
        )
    batch = tree.batch if batch is None else batch
    parts = []
    bounds = split_rows(graph, tree.sizes, len(tree.children), batch)
    for child, (start, stop, rows) in zip(tree.children, bounds):
        xi = rows_of(graph, x, start, stop, batch)
        if isinstance(child, Plan):
            parts.append(_rows(graph, child, xi, rows, block))
        else:
            parts.append(block(xi, child.target if child is not None else None))
    return graph.call_function(cat_rows, tuple(parts))


def _ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node ``node`` reads, directly or not."""
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _latest(graph: fx.Graph, nodes: list[Any]) -> fx.Node:
    """The node of ``nodes`` that comes last in ``graph``."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    return max((n for n in nodes if isinstance(n, fx.Node)), key=order.__getitem__)


def _rederive_lengths(
    graph: fx.Graph,
    sources: list[fx.Node],
    seq_nodes: set[fx.Node],
    new_seq: fx.Node | None,
    symbol,
    fixed: int | None = None,
) -> None:
    """Make every node downstream of ``sources`` read lengths derived from ``new_seq`` instead of ``S``.

    ``fixed``: ``S`` is a number in the graph, not a symbol (a vision model's patch sequence); then the
    size arguments equal to it (``view``'s shape, ``arange``'s end, ...) at a sequence position of their
    output are what reads it."""
    downstream: set[fx.Node] = set()
    stack = list(sources)
    while stack:
        node = stack.pop()
        for user in node.users:
            if user not in downstream:
                downstream.add(user)
                stack.append(user)

    depends: dict[fx.Node, bool] = {s: False for s in sources}  # the lengthened tensors themselves
    index = {n: i for i, n in enumerate(graph.nodes)}

    def uses_seq(node: fx.Node) -> bool:
        if node in depends:
            return depends[node]
        todo, found = [node], set()
        while todo:
            n = todo.pop()
            if n in depends or n in found:
                continue
            found.add(n)
            if n not in seq_nodes and n.op == "call_function":
                todo.extend(a for a in n.all_input_nodes if a not in depends)
        for n in sorted(found, key=index.__getitem__):  # inputs first (a node read twice, too)
            if n in seq_nodes or (fixed is not None and fixed_sizes(n, fixed)):
                depends[n] = True
            elif n.op != "call_function" or n in downstream:
                depends[n] = False
            else:
                depends[n] = any(depends.get(a, False) for a in n.all_input_nodes)
        return depends[node]

    copies: dict[fx.Node, fx.Node] = {}

    state: dict[fx.Node, bool] = {}

    def from_state(node: fx.Node) -> bool:
        """Computed from the model's parameters or buffers (not from the inputs alone)."""
        if node not in state:
            state[node] = node.op == "get_attr" or (
                node.op == "call_function" and any(from_state(a) for a in node.all_input_nodes)
            )
        return state[node]

    def copy(node: fx.Node) -> fx.Node:
        if node in seq_nodes:
            return new_seq
        if fixed is not None and any(not uses_seq(a) and from_state(a) for a in node.all_input_nodes):
            raise ValueError(
                f"prompt tuning cannot lengthen {node.format_node()}: it combines the {fixed} fixed sequence "
                "positions with the model's parameters or buffers (a relative position table, say), which "
                "has no entries for the prompt positions"
            )
        if node not in copies:
            new = graph.node_copy(node, lambda a: copy(a) if uses_seq(a) else a)
            new.meta = dict(node.meta)
            if fixed is not None:
                lengthen_sizes(new, node, fixed, new_seq)
            copies[node] = new
        return copies[node]

    for node in [n for n in graph.nodes if n in downstream]:
        if fixed is not None:
            lengthen_sizes(node, node, fixed, new_seq)
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
            elif node.op != "output" and (_has_symbol(arg, symbol) or has_length(arg, fixed)):
                raise ValueError(
                    f"prompt tuning cannot lengthen {arg.format_node()}: it has the input's sequence length "
                    f"and {node.name} downstream of the prompt reads it"
                )


def _has_symbol(node: fx.Node, symbol) -> bool:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return False
    return any(_symbol(d) is not None and symbol in _symbol(d).free_symbols for d in val.shape)
