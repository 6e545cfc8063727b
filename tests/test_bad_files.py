"""Malformed adapter files: always an AdapterFileError that says what is wrong, never another exception."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_folders import assert_unchanged, copy_folder, make_folders, snapshot
from conftest import make
from safetensors.torch import load_file, save_file

import fxadapt
from fxadapt import AdapterFileError


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("valid"))


@pytest.fixture(scope="module")
def model():
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("keep", fxadapt.LoRAConfig(init_weights="bert"), set_active=True)
    return model


def _edit_json(folder, change):
    raw = json.loads((folder / "adapter_config.json").read_text())
    change(raw)
    (folder / "adapter_config.json").write_text(json.dumps(raw))


CASES = {
    # issue 12.8's cases
    "peft without r, tensors of rank 4": ("peft", lambda raw: raw.pop("r"), "has rank 4, its config says 8"),
    "peft lora_alpha='abc'": ("peft", lambda raw: raw.update(lora_alpha="abc"), "alpha must be a finite"),
    "fxadapt config [1, 2]": ("fxadapt", lambda raw: raw.update(config=[1, 2]), "must be a dict of options"),
    "adapterhub config [1, 2]": ("adapterhub_lora", lambda raw: raw.update(config=[1, 2]), "neither"),
    "fxadapt r 10**11": ("fxadapt", lambda raw: raw["config"].update(r=10**11), "would hold"),
    "adapterhub r 10**11": ("adapterhub_lora", lambda raw: raw["config"].update(r=10**11), "would hold"),
    "peft r 10**11": ("peft", lambda raw: raw.update(r=10**11), "has rank 4, its config says 100000000000"),
    # issue 12.4: alpha=inf in a file
    "fxadapt alpha Infinity": ("fxadapt", lambda raw: raw["config"].update(alpha=float("inf")), "finite"),
    "adapterhub alpha NaN": (
        "adapterhub_lora",
        lambda raw: raw["config"].update(alpha=float("nan")),
        "finite",
    ),
    "peft rslora 'yes'": ("peft", lambda raw: raw.update(use_rslora="yes"), "use_rslora must be"),
    "fxadapt architecture list": ("fxadapt", lambda raw: raw.update(architecture=["lora"]), "not supported"),
    "union part not a dict": (
        "fxadapt_union",
        lambda raw: raw["config"]["configs"].append(3),
        "list of config",
    ),
    "union part r=True": ("fxadapt_union", lambda raw: raw["config"]["configs"][0].update(r=True), "int"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_configs(folders, model, tmp_path, case):
    kind, change, message = CASES[case]
    folder = copy_folder(folders[kind], tmp_path / "f")
    _edit_json(folder, change)
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=message):
        model.load_adapter(folder, load_as="new")
    assert_unchanged(model, before)


def test_deeply_nested_json(folders, model, tmp_path):
    folder = copy_folder(folders["fxadapt"], tmp_path / "f")
    (folder / "adapter_config.json").write_text('{"config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        model.load_adapter(folder, load_as="new")
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, k: t.update({k: torch.full_like(t[k], float("nan"))}), "non-finite values"),
        (lambda t, k: t.update({k: torch.ones(t[k].shape, dtype=torch.int64)}), "wrong dtypes"),
    ],
    ids=["nan", "int"],
)
def test_bad_weights(folders, model, tmp_path, change, message):
    folder = copy_folder(folders["fxadapt"], tmp_path / "f")
    tensors = load_file(str(folder / "adapter.safetensors"))
    change(tensors, sorted(tensors)[0])
    save_file(tensors, str(folder / "adapter.safetensors"))
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=message):
        model.load_adapter(folder, load_as="new")
    assert_unchanged(model, before)


def test_every_valid_folder_loads(folders, model):
    for kind, folder in folders.items():
        assert model.load_adapter(folder, load_as=f"ok_{kind}") == f"ok_{kind}"
        model.delete_adapter(f"ok_{kind}")
