"""Reading the AdapterHub reference cases per architecture (``tests/fixtures/adapterhub_arch/``).

Every case was made by AdapterHub's ``adapters`` 1.3 itself (transformers 4.57): a base model saved
before any adapter, AdapterHub's adapter folder, and what AdapterHub computes after loading it
(``expected.safetensors``). See the fixture folder's README.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

ROOT = Path(__file__).parent / "fixtures" / "adapterhub_arch"


def index() -> dict:
    return json.loads((ROOT / "index.json").read_text())


def made_cases() -> list[tuple[str, str]]:
    """(arch, case) of every case AdapterHub made, in index order."""
    return [(c["arch"], c["method"]) for c in index()["cases"] if c["status"] == "made"]


def case_info(arch: str, case: str) -> dict:
    return json.loads((ROOT / arch / case / "case.json").read_text())


def base_model(arch: str, case: str) -> torch.nn.Module:
    """The saved base, in transformers 5, as the case says it was run (eager attention unless noted)."""
    info = case_info(arch, case)
    cls = getattr(transformers, info["model_class"])
    model = cls.from_pretrained(
        ROOT / arch / "base", attn_implementation=info.get("attn_implementation", "eager")
    )
    if arch == "xmod":
        _adapterhub_xmod(model)
    return model.eval()


def inputs(arch: str) -> dict[str, torch.Tensor]:
    tensors = load_file(str(ROOT / arch / "inputs.safetensors"))
    return {k[len("input.") :]: v for k, v in tensors.items() if k.startswith("input.")}


def expected(arch: str, case: str) -> dict[str, torch.Tensor]:
    tensors = load_file(str(ROOT / arch / case / "expected.safetensors"))
    return {k[len("expected.") :]: v for k, v in tensors.items() if k.startswith("expected.")}


def _adapterhub_xmod(model: torch.nn.Module) -> None:
    """X-MOD as AdapterHub runs it: its ``adapters.init`` deletes the language adapters, so each
    output sublayer is ``LayerNorm(dropout(dense(h)) + input)`` (see the fixtures' README). The
    reference's base model is that one, so the test builds it (this is the oracle's model, not fxadapt).
    The language adapters stay as unused modules: XmodModel.forward still reads their names to find
    the default language id, which the patched sublayers then ignore."""
    import types

    def forward(self, hidden_states, input_tensor, lang_ids=None):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)

    for module in model.modules():
        if type(module).__name__ == "XmodOutput":
            module.forward = types.MethodType(forward, module)
