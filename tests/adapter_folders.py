"""Valid adapter folders of every format for one tiny BERT, for the bad-file and fuzz tests.

fxadapt's folder is written by fxadapt; AdapterHub's are the AdapterHub-made fixtures (the same
BERT shape); PEFT's is written by PEFT itself.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from conftest import make
from peft import LoraConfig, get_peft_model

import fxadapt

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"


def make_folders(root: Path) -> dict[str, Path]:
    """``{kind: folder}``: fxadapt LoRA and union, AdapterHub LoRA and seq_bn, PEFT LoRA."""
    model = fxadapt.AdaptedModel(make("bert"))
    torch.manual_seed(0)
    model.add_adapter("lora", fxadapt.LoRAConfig(r=4, alpha=16, init_weights="bert", intermediate_lora=True))
    model.add_adapter("union", "lora[r=2]|prefix_tuning[prefix_length=2,bottleneck_size=4]")
    out = {"fxadapt": root / "fxadapt", "fxadapt_union": root / "fxadapt_union"}
    model.save_adapter(out["fxadapt"], "lora")
    model.save_adapter(out["fxadapt_union"], "union")
    for case in ("lora", "seq_bn"):
        out[f"adapterhub_{case}"] = root / f"adapterhub_{case}"
        shutil.copytree(FIXTURES / f"bert__{case}" / "adapter", out[f"adapterhub_{case}"])
    torch.manual_seed(1)
    peft_model = get_peft_model(
        copy.deepcopy(make("bert")),
        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False),
    )
    out["peft"] = root / "peft"
    peft_model.save_pretrained(out["peft"])
    return out


def snapshot(model: fxadapt.AdaptedModel) -> dict:
    return {
        "names": list(model.adapters),
        "active": model.active_adapters,
        "merged": model.merged_adapters,
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_unchanged(model: fxadapt.AdaptedModel, before: dict) -> None:
    assert list(model.adapters) == before["names"]
    assert model.active_adapters == before["active"] and model.merged_adapters == before["merged"]
    state = model.state_dict()
    assert list(state) == list(before["state"])
    for k, v in before["state"].items():
        assert torch.equal(state[k], v), k


def copy_folder(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to
