"""Misuse gets a clear error before anything changes: names, active lists, merged training, odd inputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch, make
from torch import nn

import fxadapt
from fxadapt import CaptureError, ConfigError, LoRAConfig


def _model():
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("a", LoRAConfig(init_weights="bert"))
    return model


@pytest.mark.parametrize("name", ["items", "keys", "update", "training", "", "a.b", "tab\t", 5, None])
def test_names_that_cannot_name_an_adapter_are_refused_with_the_rule(name, tmp_path):
    """Issue 12.9: names clashing with nn.ModuleDict attributes failed with KeyError."""
    model = _model()
    with pytest.raises(ConfigError, match="an adapter name must be a non-empty printable string"):
        model.add_adapter(name, "lora")
    model.save_adapter(tmp_path / "a", "a")
    if name is not None:  # load_as=None takes the file's name
        with pytest.raises(ConfigError, match="an adapter name must be"):
            model.load_adapter(tmp_path / "a", load_as=name)
    assert list(model.adapters) == ["a"]


def test_a_file_naming_an_unusable_adapter_name_is_a_file_error(tmp_path):
    model = _model()
    model.save_adapter(tmp_path / "a", "a")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    for bad in ("items", ["x"]):
        raw["name"] = bad
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(raw))
        with pytest.raises(fxadapt.AdapterFileError, match="pass load_as="):
            model.load_adapter(tmp_path / "a")
    assert model.load_adapter(tmp_path / "a", load_as="fine") == "fine"


@pytest.mark.parametrize(
    "names, message",
    [
        (["a", "a"], r"adapter 'a' appears twice in Stack\('a', 'a'\)"),
        (5, "must be a name, a list of names or a composition block"),
        ([5], "must be a name, a list of names or a composition block"),
        (["nope"], "no adapter named"),
    ],
)
def test_active_adapter_lists(names, message):
    """Issue 12.5 and 12.9: set_active_adapters(["a", "a"]) applied a twice; (5) gave a TypeError."""
    model = _model()
    model.set_active_adapters("a")
    with pytest.raises(ConfigError, match=message):
        model.set_active_adapters(names)
    with pytest.raises(ConfigError, match=message):
        model.train_adapter(names)
    assert model.active_adapters == ("a",)


def test_training_a_merged_adapter_is_refused():
    """Issue 12.11: train_adapter on a merged adapter failed only at backward."""
    model = _model()
    model.merge_adapter("a")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ConfigError, match="merged into the base weights.*reset_adapter"):
        model.train_adapter("a")
    assert [p.requires_grad for p in model.parameters()] == flags
    model.reset_adapter("a")
    model.train_adapter("a")
    model(**batch()).last_hidden_state.sum().backward()
    assert all(p.grad is not None for p in model.adapters["a"].parameters())


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_a_model_without_a_config_needs_example_inputs():
    """Issue 12.11: a non-HF model without example_inputs gave AttributeError: 'config'."""
    with pytest.raises(CaptureError, match="pass example_inputs="):
        fxadapt.AdaptedModel(_Plain()).add_adapter("x", "lora")


def test_tensors_inside_a_list_argument_are_refused():
    """Issue 12.11: a tensor inside a list keyword argument crashed (or was baked in as a constant)."""
    model = _model()
    b = batch()
    with pytest.raises(CaptureError, match="'head_mask' holds tensors inside a list"):
        model(input_ids=b["input_ids"], head_mask=[torch.ones(4), torch.ones(4)])
    with pytest.raises(CaptureError, match="holds tensors inside a dict"):
        model(input_ids=b["input_ids"], extra={"x": torch.ones(1)})


def test_moving_the_model_after_a_call_captures_again():
    """Issue 12.11: .to("meta") after a forward failed: the graphs had the old device baked in."""
    model = _model()
    model.set_active_adapters("a")
    model.eval()
    b = batch()
    with torch.no_grad():
        expected = model(**b).last_hidden_state
    model.to(torch.float64)
    with torch.no_grad():
        out = model(**b).last_hidden_state
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), expected, rtol=1e-4, atol=1e-5)
    model.to("meta")
    out = model(**{k: v.to("meta") for k, v in b.items()}).last_hidden_state
    assert out.device.type == "meta" and out.shape == expected.shape


def test_a_config_without_format_is_not_taken_for_adapterhubs(tmp_path):
    """Issue 12.11: an fxadapt config without "format" was read as AdapterHub's, with a misleading error."""
    model = _model()
    model.save_adapter(tmp_path / "a", "a")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    del raw["format"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(fxadapt.AdapterFileError, match='no \'"format": "fxadapt"\' entry'):
        model.load_adapter(tmp_path / "a", load_as="b")
    raw["format"] = "other"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(fxadapt.AdapterFileError, match="unknown adapter file format 'other'"):
        model.load_adapter(tmp_path / "a", load_as="b")
    assert list(model.adapters) == ["a"]
