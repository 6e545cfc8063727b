"""docs/adding-a-method.md, followed: the LoHa example (tests/example_loha.py) works end to end.

Oracle: PEFT's LoHa with the same weights, loaded from the folder PEFT saves.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, make
from peft import LoHaConfig as PeftLoHaConfig
from peft import get_peft_model

import fxadapt
from fxadapt import registry


@pytest.fixture(scope="module")
def loha():
    import example_loha

    yield example_loha
    registry.unregister("loha")


def test_loha_is_identity_at_init_and_trains(loha) -> None:
    model = fxadapt.adapt(make("bert"), "loha", compile=False)
    assert set(model.adapter_summary(as_dict=True)[0].items()) >= {("architecture", "loha"), ("train", True)}
    inputs = batch()
    model.eval()
    assert (model(**inputs).last_hidden_state - model.base(**inputs).last_hidden_state).abs().max() == 0
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    base = {k: v.clone() for k, v in model.base.state_dict().items()}
    for _ in range(2):
        model(**inputs).last_hidden_state.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, model.base.state_dict()[k]) for k, v in base.items())
    assert all(m.hada_w2_b.abs().sum() > 0 for _, m in model.adapters["loha"].items())


def test_loha_matches_peft_and_merges(loha, tmp_path) -> None:
    base = make("bert").eval()
    peft_model = get_peft_model(
        copy.deepcopy(base),
        PeftLoHaConfig(r=4, alpha=8, target_modules=["query", "value"], init_weights=False),
    )
    peft_model.save_pretrained(tmp_path / "peft")
    inputs = batch()
    want = peft_model(**inputs).last_hidden_state

    model = fxadapt.AdaptedModel(base)
    name = model.load_adapter(tmp_path / "peft", load_as="h", set_active=True)
    assert model.adapters[name].config == loha.LoHaConfig(r=4, alpha=8, target_roles=["q", "v"])
    model.eval()
    got = model(**inputs).last_hidden_state
    assert (got - want).abs().max() < 1e-5
    assert (want - base(**inputs).last_hidden_state).abs().max() > 1e-3  # the update is not negligible

    model.merge_adapter("h")
    assert (model(**inputs).last_hidden_state - got).abs().max() < 1e-5
    assert all("call_module" != n.op for n in model.graph_module.graph.nodes)

    model.reset_adapter()
    model.save_adapter(tmp_path / "own", "h")
    again = fxadapt.AdaptedModel(make("bert").eval())
    again.load_adapter(tmp_path / "own", set_active=True)
    again.eval()
    assert torch.equal(again(**inputs).last_hidden_state, got)
