"""Adapter folders: bitwise roundtrip, and bad files refused with the model left as it was."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import batch, make
from safetensors.torch import load_file, save_file

import fxadapt
from fxadapt import LoRAConfig


def _saved(tmp_path, arch="bert"):
    model = fxadapt.AdaptedModel(make(arch))
    model.add_adapter("a", LoRAConfig(r=4, alpha=16, init_weights="bert", intermediate_lora=True))
    model.save_adapter(tmp_path / "a", "a")
    return model, tmp_path / "a"


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_roundtrip_is_bitwise(tmp_path, arch):
    model, folder = _saved(tmp_path, arch)
    assert sorted(os.listdir(folder)) == ["adapter.safetensors", "adapter_config.json"]
    keys = load_file(str(folder / "adapter.safetensors")).keys()
    expected = "encoder.layer.0.attention.self.query.lora_A" if arch == "bert" else "h.0.attn.c_attn.lora_A"
    assert expected in keys
    other = fxadapt.AdaptedModel(make(arch))
    name = other.load_adapter(folder, set_active=True)
    assert name == "a"
    for (k1, v1), (k2, v2) in zip(
        model.adapters["a"].state_dict().items(), other.adapters["a"].state_dict().items()
    ):
        assert k1 == k2 and torch.equal(v1, v2)
    assert other.adapters["a"].config == model.adapters["a"].config
    model.set_active_adapters("a")
    model.eval()
    other.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch()).last_hidden_state, other(**batch()).last_hidden_state)


def _unchanged(model, before):
    assert list(model.adapters) == before["names"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before["state"][k])


def _snapshot(model):
    return {"names": list(model.adapters), "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _corrupt_truncate(folder):
    data = (folder / "adapter.safetensors").read_bytes()
    (folder / "adapter.safetensors").write_bytes(data[: len(data) // 2])


def _corrupt_shape(folder):
    t = load_file(str(folder / "adapter.safetensors"))
    t["encoder.layer.0.attention.self.query.lora_A"] = torch.zeros(3, 32)
    save_file(t, str(folder / "adapter.safetensors"))


def _corrupt_missing_key(folder):
    t = load_file(str(folder / "adapter.safetensors"))
    del t["encoder.layer.1.intermediate.dense.lora_B"]
    save_file(t, str(folder / "adapter.safetensors"))


def _corrupt_json(folder):
    (folder / "adapter_config.json").write_text("{not json")


def _corrupt_option(folder):
    raw = json.loads((folder / "adapter_config.json").read_text())
    raw["config"]["rank"] = 3
    (folder / "adapter_config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_corrupt_truncate, "could not be read"),
        (_corrupt_shape, "wrong shapes"),
        (_corrupt_missing_key, "missing tensors"),
        (_corrupt_json, "not valid JSON"),
        (_corrupt_option, "no option"),
        (lambda f: (f / "adapter.safetensors").unlink(), "missing"),
    ],
)
def test_bad_files_raise_and_leave_model_unchanged(tmp_path, corrupt, message):
    _, folder = _saved(tmp_path)
    corrupt(folder)
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("keep", "lora")
    before = _snapshot(model)
    with pytest.raises(fxadapt.AdapterFileError, match=message):
        model.load_adapter(folder)
    _unchanged(model, before)


def test_missing_folder_and_name_clash(tmp_path):
    model, folder = _saved(tmp_path)
    with pytest.raises(fxadapt.AdapterFileError, match="not an adapter folder"):
        model.load_adapter(tmp_path / "nowhere")
    with pytest.raises(fxadapt.ConfigError, match="load_as"):
        model.load_adapter(folder)
    assert model.load_adapter(folder, load_as="b") == "b"


def test_write_is_atomic(tmp_path, monkeypatch):
    model, folder = _saved(tmp_path)
    original = (folder / "adapter.safetensors").read_bytes()
    with torch.no_grad():
        next(model.adapters["a"].parameters()).add_(1)

    def fail(new, target):
        raise OSError("disk full")

    monkeypatch.setattr(fxadapt.formats.fileio, "_swap", fail)
    with pytest.raises(OSError):
        model.save_adapter(folder, "a")
    assert (folder / "adapter.safetensors").read_bytes() == original
    assert sorted(os.listdir(folder)) == ["adapter.safetensors", "adapter_config.json"]
    assert os.listdir(tmp_path) == ["a"], "the temporary folder is removed"


def test_own_format_loads_across_head_classes(tmp_path):
    _, folder = _saved(tmp_path)
    with_head = fxadapt.AdaptedModel(make("bert", head=True))
    with_head.load_adapter(folder)
    assert with_head.adapters["a"].site_keys[0] == "bert.encoder.layer.0.attention.self.query"
    with_head.save_adapter(tmp_path / "again", "a")
    bare = fxadapt.AdaptedModel(make("bert"))
    bare.load_adapter(tmp_path / "again")
    for v1, v2 in zip(
        with_head.adapters["a"].state_dict().values(), bare.adapters["a"].state_dict().values()
    ):
        assert torch.equal(v1, v2)


def _fake_hub_cache(cache, repo_id, source):
    """Lay out ``source``'s files as the Hugging Face hub cache does for ``repo_id``."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)


def test_load_from_hub_cache_offline(tmp_path, monkeypatch):
    model, folder = _saved(tmp_path)
    _fake_hub_cache(tmp_path / "hub", "someone/bert-lora", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    other = fxadapt.AdaptedModel(make("bert"))
    assert other.load_adapter("someone/bert-lora", load_as="hubbed") == "hubbed"
    for v1, v2 in zip(
        model.adapters["a"].state_dict().values(), other.adapters["hubbed"].state_dict().values()
    ):
        assert torch.equal(v1, v2)
    with pytest.raises(fxadapt.AdapterFileError, match="could not be fetched"):
        other.load_adapter("someone/not-cached")
    assert list(other.adapters) == ["hubbed"]


def test_a_loaded_adapter_follows_the_models_mode(tmp_path):
    """Dropout in a loaded adapter must be off when the model it joins is in eval mode."""
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("x", LoRAConfig(dropout=0.5, init_weights="bert"))
    model.save_adapter(tmp_path, "x")
    other = fxadapt.AdaptedModel(make("bert")).eval()
    other.load_adapter(tmp_path, set_active=True)
    assert not any(m.training for m in other.adapters["x"].modules())
    with torch.no_grad():
        first = other(**batch()).last_hidden_state
        assert torch.equal(first, other(**batch()).last_hidden_state)
