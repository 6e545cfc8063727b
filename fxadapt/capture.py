"""Capture a Hugging Face model into an ATen-level FX graph with ``torch.export``.

The captured graph takes the call's tensors as flat positional inputs and returns the flat leaves of
the model's output; the runtime rebuilds the model's own ``ModelOutput`` from ``out_spec``. Parameters
are ``get_attr`` nodes whose targets are the base model's names under ``base.``, so every graph built
from a capture runs over the one root module that owns the base model and the adapters.
"""

from __future__ import annotations

import inspect
import operator
import os
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils._pytree import TreeSpec, tree_leaves

from . import cache
from .errors import CaptureError

BASE = "base"
CONSTS = "consts"
# torch.export patches process globals while it runs (builtins.max/min, nn.Module.__call__) and the
# model's training flag is switched for the capture: one capture, and one graph build, at a time.
EXPORT_LOCK = threading.RLock()
_BATCH, _SEQ, _TARGET_SEQ = 2, 8, 6
_REMEDIES = (
    'load the model with attn_implementation="eager" (Gemma-2, DeBERTa-v2, GPT-J need it)',
    "pass use_cache=False (cache objects such as T5's are not pytrees)",
    "call the model once with the same keyword arguments in plain PyTorch to check they are valid",
    "set the config's layerdrop options (encoder_layerdrop, decoder_layerdrop) to 0: LayerDrop skips "
    "layers at random in training, which one graph cannot express",
)


@dataclass
class Capture:
    """One captured graph: what it takes, what it returns, the constants it needs."""

    graph: fx.Graph
    input_names: tuple[str, ...]
    out_spec: TreeSpec
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    # Generation's graphs run part of an adapter (fxadapt/generation/graphs.py): ``select(method,
    # {site key: module target}, sites)`` keeps the targets to insert into this graph (None: all), and
    # ``cached_sites`` are projections the graph reads from its cache instead of computing them (a
    # decoder's cross-attention keys: the site's node is the cache input).
    select: Callable[[Any, dict[str, str], Any], dict[str, str]] | None = None
    cached_sites: list = field(default_factory=list)
    # whether the graph's inputs already hold ``Parallel``'s ``channels·B`` rows (a decode step reads the
    # replicated cache; AdapterHub's ``adapter_input_parallelized``): the setup does not repeat them again
    parallelized: bool = False
    # compile the graph as one even under regional compilation (generation marks its own static dims)
    compile_whole: bool = False


class _Bound(nn.Module):
    """Binds the call's non-tensor keyword arguments so that only tensors are graph inputs."""

    def __init__(self, model: nn.Module, static: dict[str, Any]) -> None:
        super().__init__()
        self.m = model
        self.static = static

    def forward(self, tensors: dict[str, torch.Tensor]) -> Any:
        return self.m(**tensors, **self.static)


def split_inputs(kwargs: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Separate a call's tensors (graph inputs) from its other arguments (baked into the graph).

    A tensor inside another argument (a list, a dict, a cache object) would be baked in as a
    constant, so it is refused.
    """
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    static = {k: v for k, v in kwargs.items() if v is not None and not isinstance(v, torch.Tensor)}
    for k, v in static.items():
        if not isinstance(v, (str, int, float)) and any(isinstance(t, torch.Tensor) for t in tree_leaves(v)):
            raise CaptureError(
                f"argument {k!r} holds tensors inside a {type(v).__name__}: fxadapt passes only "
                "arguments that are tensors themselves into its graphs; pass it as one tensor, or "
                "call the base model for this input"
            )
    return tensors, static


def default_static(model: nn.Module, given: dict[str, Any]) -> dict[str, Any]:
    """Arguments fxadapt adds so the model captures: no KV cache object in the outputs."""
    params = inspect.signature(model.forward).parameters
    extra = {}
    if "use_cache" in params and "use_cache" not in given:
        extra["use_cache"] = False
    return extra


def example_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Inputs made from the model's config, for a capture before any real call."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise CaptureError(
            f"{type(model).__name__} has no Hugging Face config to make example inputs from: pass "
            "example_inputs={...} (keyword arguments of one valid call) to AdaptedModel, or call it once first"
        )
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    name = getattr(model, "main_input_name", "input_ids")
    accepted = inspect.signature(model.forward).parameters
    if name == "pixel_values":
        size = getattr(cfg, "image_size", 32)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        channels = getattr(cfg, "num_channels", 3)
        return {"pixel_values": torch.randn(_BATCH, channels, h, w, device=device)}
    vocab = getattr(cfg, "vocab_size", 2) or 2
    ids = torch.randint(0, vocab, (_BATCH, _SEQ), device=device)
    out: dict[str, torch.Tensor] = {name: ids}
    if "attention_mask" in accepted:
        out["attention_mask"] = torch.ones_like(ids)
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in accepted:
        out["decoder_input_ids"] = torch.randint(0, vocab, (_BATCH, _TARGET_SEQ), device=device)
    return out


def _dynamic_dims(name: str, t: torch.Tensor) -> dict[int, int]:
    """Which dims of an input vary between calls (batch always; sequence for token tensors)."""
    dims = {0: _BATCH} if t.dim() >= 1 else {}
    tokenish = not t.is_floating_point() or name in ("inputs_embeds", "decoder_inputs_embeds")
    if t.dim() >= 2 and tokenish:
        target = name.startswith("decoder_")
        dims[1] = _TARGET_SEQ if target else _SEQ
    return dims


def _stand_in(name: str, t: torch.Tensor, dims: dict[int, int], seq2seq: bool) -> torch.Tensor:
    """A tensor like ``t`` with its varying dims set to fixed sizes above 1 (export specialises 0/1)."""
    shape = list(t.shape)
    for d, size in dims.items():
        shape[d] = size
    if name == "labels" and seq2seq and len(shape) >= 2:
        shape[1] = _TARGET_SEQ
    if t.is_floating_point():
        return torch.randn(shape, dtype=t.dtype, device=t.device)
    return torch.ones(shape, dtype=t.dtype, device=t.device)


def _failing_frame(exc: BaseException) -> str:
    """The innermost frame outside torch itself: the model code that did not capture."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)]
    frames = [f for f in frames if not f.filename.endswith(os.path.join("fxadapt", "capture.py"))]
    if not frames:
        return "an operation inside torch (no model frame in the traceback)"
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def capture(model: nn.Module, kwargs: dict[str, Any], training: bool = True) -> Capture:
    """Export ``model(**kwargs)`` with dynamic batch and sequence dims, in train or eval mode."""
    tensors, static = split_inputs(kwargs)
    static = {**default_static(model, kwargs), **static}
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    dims = {k: _dynamic_dims(k, t) for k, t in tensors.items()}
    stand_ins = {k: _stand_in(k, t, dims[k], seq2seq) for k, t in tensors.items()}
    shapes = {k: {d: Dim.DYNAMIC for d in dims[k]} for k in tensors}
    parts = {
        "tensors": [(k, str(t.dtype), t.dim(), sorted(dims[k])) for k, t in sorted(tensors.items())],
        "static": sorted((k, repr(v)) for k, v in static.items()),
        "training": training,
    }
    key = cache.capture_key(model, parts)
    with EXPORT_LOCK:
        ep = cache.load_program(key, model) if key is not None else None
        if ep is not None:
            try:
                return _rebase(ep, model, by_name=True)
            except Exception as exc:  # a program that loads but does not fit this call: rebuild it
                cache.discard_program(key, exc)
        was_training = model.training
        model.train(training)
        try:
            ep = torch.export.export(
                _Bound(model, static), (stand_ins,), dynamic_shapes=(shapes,), strict=False
            )
        except Exception as exc:
            raise CaptureError(
                f"{type(model).__name__} could not be captured by torch.export. "
                f"Failing operation: {_failing_frame(exc)}. Error: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ''}. "
                "Known remedies: " + "; ".join(_REMEDIES) + "."
            ) from exc
        finally:
            model.train(was_training)
        captured = _rebase(ep, model)
        if key is not None:
            cache.save_program(key, ep)
        return captured


def _inline_grad_regions(gm: fx.GraphModule) -> None:
    """Inline ``wrap_with_set_grad_enabled`` sub-graphs (e.g. Llama's rotary no-grad block).

    torch.compile breaks the graph at that higher-order op; its operands never require grad
    (position ids, buffers), so running its ops inline computes the same values with no autograd
    history, and the compiled graph stays whole.
    """
    hop = torch.ops.higher_order.wrap_with_set_grad_enabled
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not hop:
            continue
        _, sub_node, *operands = node.args
        sub = getattr(gm, sub_node.target)
        env: dict[fx.Node, Any] = {}
        placeholders = iter(operands)
        outputs: Any = None
        with graph.inserting_before(node):
            for inner in sub.graph.nodes:
                if inner.op == "placeholder":
                    env[inner] = next(placeholders)
                elif inner.op == "output":
                    outputs = fx.node.map_arg(inner.args[0], env.__getitem__)
                else:
                    new = graph.node_copy(inner, env.__getitem__)
                    if inner.op == "get_attr":
                        new.target = f"{sub_node.target}.{inner.target}"
                    env[inner] = new
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(outputs[user.args[1]])
                graph.erase_node(user)
        if node.users:
            raise CaptureError("a no-grad region of the exported graph is used in an unexpected way")
        graph.erase_node(node)
        if not sub_node.users:
            graph.erase_node(sub_node)


def _owned(model: nn.Module, path: str, value: Any, by_name: bool = False) -> bool:
    """Whether ``path`` names ``value`` in ``model`` itself (a parameter or buffer, not an export constant).

    A tensor created inside ``forward`` (GPT-Neo's masked bias, T5's shifted labels) becomes an export
    constant named ``<module path>.lifted_tensor_N``: it lives only in the exported module. A program
    loaded from the disk cache holds stand-ins for the weights: ``by_name`` matches them by name and shape.
    """
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    if by_name and isinstance(obj, torch.Tensor) and isinstance(value, torch.Tensor):
        return tuple(obj.shape) == tuple(value.shape) and obj.dtype == value.dtype
    return obj is value


def _rebase(ep: torch.export.ExportedProgram, model: nn.Module, by_name: bool = False) -> Capture:
    """Turn the exported module's graph into a flat-I/O graph over ``base.*`` and ``consts.*``."""
    gm = ep.module()
    _inline_grad_regions(gm)
    graph = gm.graph
    in_spec = ep.call_spec.in_spec
    names = tuple(in_spec.children()[0].children()[0].context)
    constants: dict[str, torch.Tensor] = {}
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        if node.target.startswith("m.") and _owned(model, node.target[2:], obj, by_name):
            node.target = f"{BASE}.{node.target[2:]}"
            if node.name.startswith("m_"):
                node._rename(node.name[2:])
        else:
            key = node.target.replace(".", "_")
            constants[key] = obj
            node.target = f"{CONSTS}.{key}"
    graph._codegen = fx.graph.CodeGen()
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    flat = out.args[0]
    out.args = (tuple(flat) if isinstance(flat, (list, tuple)) else (flat,),)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(names):
        raise CaptureError(
            f"the exported graph has {len(placeholders)} inputs but the call gave {len(names)} tensors"
        )
    return Capture(graph=graph, input_names=names, out_spec=ep.call_spec.out_spec, constants=constants)
