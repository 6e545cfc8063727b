"""How a built graph is handed to ``torch.compile``: per layer shape (regional) or whole.

``compile="regional"`` traces and compiles each distinct layer shape once and reuses it for every
layer of that shape (``passes.regions``), so a cold start compiles a fraction of the model while a
step runs the same kernels; what lies outside the layers (embeddings, head, loss) runs eagerly.
``compile="whole"`` compiles the whole graph as one (inductor may then fuse the loss, and across
layer boundaries). ``compile=True`` picks, for the device the model is on, the mode whose training
step measured faster: on CPU the whole graph (BERT-base: 0.95x the eager step, regional 1.00x; Llama
4L/512: 0.90x and 0.96x, docs/performance.md), at twice regional's cold start; elsewhere regional
compilation for a model of at least ``REGIONAL_MIN_LAYERS`` layers and whole below that, PyTorch's
recipe for start-up time (with few layers regional compilation saves little and the eager loss weighs
more).
Graphs whose layers were moved into checkpointed sub-graphs, and generation's graphs (which mark
their own static dims), always compile whole.

On CPU inductor is told to draw random numbers (dropout masks) with ATen's generator
(``fallback_random``) instead of its own per-element generator inside the fused kernels: on BERT-base
training that is 5% of a step (docs/performance.md), and compiled dropout then draws the same masks as
eager for the same seed. On CUDA inductor's own generator is the fast one and is kept. A user's
``compile_options`` override both defaults.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import fx, nn

from passes.checkpoint import layer_runs
from passes.cleanup import clone
from passes.regions import regionalize

from . import cache
from .errors import ConfigError

MODES = ("auto", "regional", "whole")
REGIONAL_MIN_LAYERS = 8
_isa_probe: threading.Thread | None = None


def compile_mode(value: Any) -> str | None:
    """The compile mode of ``AdaptedModel(compile=...)``: None (eager), "auto", "regional" or "whole"."""
    if value is False or value is None:
        return None
    if value is True:
        return "auto"
    if isinstance(value, str) and value in MODES:
        return value
    raise ConfigError(
        f"compile={value!r} is not a compile mode: pass True (the whole graph on CPU; elsewhere regional "
        f"compilation for models of {REGIONAL_MIN_LAYERS} layers or more, the whole graph below that), "
        f"False (eager), or one of "
        f"{', '.join(repr(m) for m in MODES)}"
    )


def check_options(options: Any) -> dict[str, Any]:
    """The user's ``compile_options`` as a dict, refused before anything is built if malformed."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ConfigError(
            f"compile_options must be a dict of torch.compile arguments, got {type(options).__name__}"
        )
    user = options.get("options")
    if user is not None and not isinstance(user, dict):
        raise ConfigError(
            f"compile_options['options'] must be a dict of inductor settings (torch.compile's options=), "
            f"got {type(user).__name__}"
        )
    return dict(options)


def effective_options(options: dict[str, Any], device: torch.device | None) -> dict[str, Any]:
    """``torch.compile``'s keyword arguments: the user's, over fxadapt's defaults for ``device``."""
    out = {"dynamic": True, **options}
    inductor = out.get("backend", "inductor") == "inductor"
    if device is not None and device.type == "cpu" and inductor and out.get("mode") is None:
        out["options"] = {"fallback_random": True, **(out.get("options") or {})}
    return out


def module_device(module: nn.Module) -> torch.device | None:
    """The device of ``module``'s first parameter or buffer (None when it holds no tensor)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def auto_mode(layers: int, device: torch.device | None) -> str:
    """What ``compile=True`` means for a graph of ``layers`` layers on ``device``."""
    if device is not None and device.type == "cpu":
        return "whole"
    return "regional" if layers >= REGIONAL_MIN_LAYERS else "whole"


def start_isa_probe(mode: str | None, options: dict[str, Any], device: torch.device | None) -> None:
    """Run inductor's CPU vector-ISA check in the background while the model is captured or loaded.

    Before its first CPU kernel, every process builds (once, then from inductor's cache) and loads a
    small library per instruction set in a child Python: six children, 0.85 s on a 2-core CPU even
    when every kernel comes from the cache (docs/performance.md). Its result is cached for the
    process, so computing it on a thread that mostly waits on the children takes it off the first
    step; ``compile_graph`` waits for the thread, so it never runs twice.
    """
    global _isa_probe
    backend = options.get("backend", "inductor")
    if (
        _isa_probe is not None
        or mode is None
        or backend != "inductor"
        or device is None
        or device.type != "cpu"
    ):
        return
    try:  # imported here, not on the thread: two threads importing the same modules can deadlock
        import torch._inductor.codecache  # noqa: F401
        import torch._inductor.cpp_builder  # noqa: F401
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list
    except ImportError:  # another torch: inductor does the check itself at the first compile
        return

    def probe() -> None:
        try:
            valid_vec_isa_list()
        except Exception:  # not cached then: inductor repeats the check and reports it itself
            return

    _isa_probe = threading.Thread(target=probe, name="fxadapt-isa-probe", daemon=True)
    _isa_probe.start()


def _wait_for_isa_probe() -> None:
    if _isa_probe is not None:
        _isa_probe.join()


def compile_graph(gm: fx.GraphModule, mode: str | None, options: dict[str, Any], whole: bool = False) -> Any:
    """The callable that runs ``gm``: itself (eager), a copy with its layers compiled, or ``gm`` compiled."""
    if mode is None:
        return gm
    _wait_for_isa_probe()
    options = effective_options(options, module_device(gm))
    checkpointed = any((n.meta.get("fxadapt") or {}).get("kind") == "checkpoint" for n in gm.graph.nodes)
    if mode == "auto":
        mode = auto_mode(len(layer_runs(gm.graph)), module_device(gm))
    if mode == "whole" or whole or checkpointed:
        return torch.compile(gm, **options)
    regional = fx.GraphModule(gm, clone(gm.graph), class_name="RegionalGraph")  # gm stays inspectable
    regional.meta["regions"] = regionalize(regional, lambda function: torch.compile(function, **options))
    return regional


def artefact_key(model: nn.Module, mode: str | None, options: dict[str, Any]) -> str | None:
    """The disk-cache key of this model's compiled artefacts, or None (eager, or the cache is off)."""
    if mode is None or cache.folder() is None:
        return None
    return cache.digest(
        {
            "model": cache.model_key(model),
            "mode": mode,
            "options": repr(sorted(effective_options(options, module_device(model)).items())),
        }
    )
