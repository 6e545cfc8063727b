"""An AdaptedModel pickles (torch.save, pickle, deepcopy) with its adapters; graphs are rebuilt after."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from conftest import batch, make

import fxadapt
from fxadapt import FxAdaptError


def _run(model):
    model.eval()
    with torch.no_grad():
        return model(**batch()).last_hidden_state


@pytest.mark.parametrize(
    "config",
    [
        fxadapt.LoRAConfig(init_weights="bert"),
        "prompt_tuning[prompt_length=3]",
        "unipelt",  # prefix tuning, a bottleneck adapter and LoRA
    ],
    ids=["lora", "prompt", "unipelt"],
)
def test_pickle_round_trip_after_a_call(config):
    """Issue 12.7: pickling crashed once an adapter was added or a forward had run."""
    model = fxadapt.AdaptedModel(make("bert"))
    torch.manual_seed(0)
    model.add_adapter("a", config, set_active=True)
    expected = _run(model)
    assert model._runners, "a built graph is there to drop"
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for again in (
        torch.load(buffer, weights_only=False),
        pickle.loads(pickle.dumps(model)),
        copy.deepcopy(model),
    ):
        assert again.active_adapters == ("a",)
        assert torch.equal(_run(again), expected)
        for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
            assert k1 == k2 and torch.equal(v1, v2)
    assert torch.equal(_run(model), expected), "the original keeps its graphs and outputs"


def test_merged_state_survives_pickling():
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("a", fxadapt.LoRAConfig(init_weights="bert"), set_active=True)
    model.merge_adapter("a")
    expected = _run(model)
    again = pickle.loads(pickle.dumps(model))
    assert again.merged_adapters == ("a",)
    assert torch.equal(_run(again), expected)
    again.reset_adapter("a")
    for k, v in make("bert").state_dict().items():
        assert torch.equal(again.base.state_dict()[k], v)


def test_parametrized_adapters_are_refused_with_the_alternatives():
    """torch cannot pickle a parametrized module (LoReFT's orthogonal projection): say what works."""
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("r", "loreft", set_active=True)
    expected = _run(model)
    with pytest.raises(FxAdaptError, match="save_adapter.*state_dict"):
        pickle.dumps(model)
    assert torch.equal(_run(copy.deepcopy(model)), expected)
