"""Activation (gradient) checkpointing on an AdaptedModel: each layer recomputed in the backward, same numbers.

With it on, the training graph holds one checkpointed sub-graph per layer; outputs and gradients are
the ones without it (dropout included: the recompute replays the random numbers), and the tensors kept
for the backward shrink. HF's own ``gradient_checkpointing_enable()`` on the model before wrapping is
honoured (its ``every_n_layers`` too).
"""

from __future__ import annotations

import pytest
import torch
from conftest import batch, make

import fxadapt
from fxadapt import ConfigError


def _model(**kw):
    model = fxadapt.AdaptedModel(make("bert", num_hidden_layers=4, **kw))
    model.add_adapter("a", "lora")
    model.add_classification_head("a", num_labels=2)
    model.train_adapter("a")
    return model


def _step(model, seed=0):
    torch.manual_seed(seed)
    out = model(**batch(4, 16), labels=torch.tensor([0, 1, 1, 0]))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out.logits.detach(), grads


def _saved_bytes(model) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of one training step."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch(4, 16), labels=torch.tensor([0, 1, 1, 0]))
    out.loss.backward()
    model.zero_grad()
    return sum(storages.values())


def _checkpointed(model) -> list[str]:
    return [
        n.meta["fxadapt"]["layer"]
        for n in model.graph_module.graph.nodes
        if n.op == "call_module" and n.target.startswith("checkpointed")
    ]


def test_checkpointing_recomputes_layers_with_the_same_numbers():
    model = _model()
    plain_logits, plain_grads = _step(model)
    plain_saved = _saved_bytes(model)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    assert _checkpointed(model) == [f"m.encoder.layer.{i}" for i in range(4)]
    logits, grads = _step(model)
    torch.testing.assert_close(logits, plain_logits, atol=0, rtol=0)  # dropout replays its random numbers
    assert grads.keys() == plain_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], plain_grads[k], atol=1e-6, rtol=1e-5)
    assert _saved_bytes(model) < 0.6 * plain_saved
    model.eval()
    assert not _checkpointed(model)  # nothing to recompute without a backward
    model.train()
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing and not _checkpointed(model)


def test_every_n_layers_and_options():
    model = _model()
    model.activation_checkpointing_enable({"use_reentrant": True}, every_n_layers=2)
    assert _checkpointed(model) == ["m.encoder.layer.0", "m.encoder.layer.2"]
    with pytest.raises(ConfigError, match="memory_budget"):
        model.gradient_checkpointing_enable({"memory_budget": 0.5})  # needs compile=True
    with pytest.raises(ConfigError, match="not supported"):
        model.gradient_checkpointing_enable({"preserve_rng_state": False})
    with pytest.raises(ConfigError, match="every_n_layers"):
        model.activation_checkpointing_enable(every_n_layers=0)


def test_hf_checkpointing_enabled_before_wrapping_is_honoured():
    hf = make("bert", num_hidden_layers=4)
    hf.activation_checkpointing_enable(every_n_layers=2)
    model = fxadapt.AdaptedModel(hf)
    model.add_adapter("a", "lora")
    model.add_classification_head("a", num_labels=2)
    model.train_adapter("a")
    assert model.is_gradient_checkpointing
    assert _checkpointed(model) == ["m.encoder.layer.0", "m.encoder.layer.2"]
    logits, grads = _step(model)
    assert torch.isfinite(logits).all() and grads
    model.gradient_checkpointing_disable()
    assert not hf.is_activation_checkpointing and not _checkpointed(model)


def test_checkpointed_graph_compiles_whole():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = fxadapt.AdaptedModel(make("bert"), compile=True, compile_options={"backend": backend})
    model.add_adapter("a", "lora")
    model.add_classification_head("a", num_labels=2)
    model.train_adapter("a")
    model.gradient_checkpointing_enable()
    out = model(**batch(), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert len(graphs) == 1
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
