"""Head files: fxadapt's format round-trips bit for bit; AdapterHub's layout (save_all_*); bad files change nothing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch, make
from safetensors.torch import load_file

import fxadapt
from fxadapt import AdapterFileError


def _model(head="classification"):
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("a", "seq_bn")
    if head == "classification":
        model.add_classification_head("a", num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"})
    else:
        model.add_masked_lm_head("a")
    with torch.no_grad():
        for p in model.heads["a"].parameters():
            if p is not model.base.get_input_embeddings().weight:
                p.add_(torch.randn_like(p) * 0.1)
    model.set_active_adapters("a")
    return model.eval()


@pytest.mark.parametrize("head", ["classification", "masked_lm"])
def test_fxadapt_format_round_trip(head, tmp_path):
    model = _model(head)
    model.save_adapter(tmp_path / "a", "a")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["adapter.safetensors", "adapter_config.json", "head.safetensors", "head_config.json"]
    saved = load_file(tmp_path / "a" / "head.safetensors")
    if head == "masked_lm":
        assert "3.weight" not in saved and "3.bias" in saved  # the tied decoder weight is the base's
    fresh = fxadapt.AdaptedModel(make("bert")).eval()
    fresh.load_adapter(tmp_path / "a", set_active=True)
    assert fresh.active_head == "a"
    for k, v in model.heads["a"].state_dict().items():
        assert torch.equal(fresh.heads["a"].state_dict()[k], v)
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, fresh(**batch()).logits)
    if head == "classification":
        assert fresh.get_labels() == ["neg", "neu", "pos"]


def test_with_head_false(tmp_path):
    model = _model()
    model.save_adapter(tmp_path / "no", "a", with_head=False)
    assert not (tmp_path / "no" / "head_config.json").exists()
    model.save_adapter(tmp_path / "yes", "a")
    fresh = fxadapt.AdaptedModel(make("bert"))
    fresh.load_adapter(tmp_path / "yes", with_head=False)
    assert not fresh.heads


def test_save_all_adapters_and_heads(tmp_path):
    model = _model()
    model.add_adapter("b", "lora")
    model.add_tagging_head("t", num_labels=4)
    model.save_all_adapters(tmp_path / "adapters")
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["a", "b"]
    assert (tmp_path / "adapters" / "a" / "head_config.json").is_file()
    assert not (tmp_path / "adapters" / "b" / "head_config.json").exists()
    model.save_all_heads(tmp_path / "heads", format="adapterhub")
    assert sorted(p.name for p in (tmp_path / "heads").iterdir()) == ["a", "t"]
    fresh = fxadapt.AdaptedModel(make("bert")).eval()
    assert fresh.load_head(tmp_path / "heads" / "t") == "t"
    assert fresh.active_head == "t"
    meta = json.loads((tmp_path / "heads" / "t" / "head_config.json").read_text())
    assert meta["model_class"] == "BertAdapterModel" and meta["config"]["head_type"] == "tagging"
    for k, v in model.heads["t"].state_dict().items():
        assert torch.equal(fresh.heads["t"].state_dict()[k], v)


def test_bad_head_files_change_nothing(tmp_path):
    model = _model()
    model.save_adapter(tmp_path / "a", "a")
    static = fxadapt.AdaptedModel(make("bert", head=True))
    with pytest.raises(AdapterFileError, match="own task head"):
        static.load_head(tmp_path / "a")
    with pytest.warns(UserWarning, match="without its head"):
        static.load_adapter(tmp_path / "a")  # the adapter alone fits, as in AdapterHub
    assert list(static.adapters) == ["a"] and not static.heads

    other = fxadapt.AdaptedModel(make("bert", hidden_size=64, intermediate_size=64))
    with pytest.raises(AdapterFileError):
        other.load_head(tmp_path / "a")
    assert not other.heads

    config = json.loads((tmp_path / "a" / "head_config.json").read_text())
    config["config"]["num_labels"] = 5
    (tmp_path / "a" / "head_config.json").write_text(json.dumps(config))
    fresh = fxadapt.AdaptedModel(make("bert"))
    with pytest.raises(AdapterFileError, match="wrong shapes"):
        fresh.load_adapter(tmp_path / "a")
    assert not fresh.adapters and not fresh.heads
