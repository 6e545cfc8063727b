"""Heads under ``Parallel`` and ``BatchSplit`` on a tiny BERT: one graph, a head per branch, loss = sum.

AdapterHub's own numbers for these compositions are checked in ``test_heads_adapterhub.py``; here:
each head's output equals its adapter and head alone, a training step reaches every branch, a branch
without a head is refused before anything changes, and torch.compile makes one graph.
"""

from __future__ import annotations

import pytest
import torch
from conftest import batch, make

import fxadapt
from fxadapt import BatchSplit, ConfigError, Parallel, Stack

B, S = 2, 9


def _model(method: str = "lora") -> fxadapt.AdaptedModel:
    torch.manual_seed(0)
    model = fxadapt.AdaptedModel(make("bert"))
    for name, labels in (("a", 2), ("b", 3)):
        model.add_adapter(name, method)
        model.add_classification_head(name, num_labels=labels)
        for p in model.adapters[name].parameters():  # move off the identity init, so branches differ
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def _alone(
    model: fxadapt.AdaptedModel, name: str, rows: slice, **inputs
) -> tuple[torch.Tensor, torch.Tensor]:
    model.set_active_adapters(name)
    with torch.no_grad():
        out = model(**{k: v[rows] for k, v in inputs.items()})
    return out.logits, out.loss


def test_parallel_gives_each_channel_its_head():
    model = _model()
    model.set_active_adapters(Parallel("a", "b"))
    assert model.active_head == ["a", "b"]
    graphs = set()
    for rows in (2, 3):  # a new batch size runs the same graph
        inputs = {**batch(rows, S), "labels": torch.tensor([1, 0, 1][:rows])}
        model.set_active_adapters(Parallel("a", "b"))
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
        graphs.add(id(model.graph_for(**inputs, output_hidden_states=True)))
        assert isinstance(out, fxadapt.MultiHeadOutput) and len(out) == 2
        assert [tuple(o.logits.shape) for o in out] == [(rows, 2), (rows, 3)]
        assert out[0].hidden_states[-1].shape[0] == rows  # each head's output has its channel's rows
        torch.testing.assert_close(out.loss, out[0].loss + out[1].loss)
        for i, name in enumerate(("a", "b")):
            logits, loss = _alone(model, name, slice(None), **inputs)
            torch.testing.assert_close(out[i].logits, logits, atol=1e-6, rtol=0)
            torch.testing.assert_close(out[i].loss, loss, atol=1e-6, rtol=0)
    assert len(graphs) == 1


def test_batchsplit_gives_each_block_its_head_and_its_labels():
    model = _model("seq_bn")
    model.set_active_adapters(Stack(BatchSplit("a", "b", batch_sizes=[1, 2])))
    assert model.active_head == BatchSplit("a", "b", batch_sizes=[1, 2])
    inputs = {**batch(3, S), "labels": torch.tensor([1, 2, 0])}
    with torch.no_grad():
        out = model(**inputs)
    assert [tuple(o.logits.shape) for o in out] == [(1, 2), (2, 3)]
    for i, (name, rows) in enumerate((("a", slice(0, 1)), ("b", slice(1, 3)))):
        logits, loss = _alone(model, name, rows, **inputs)
        torch.testing.assert_close(out[i].logits, logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(out[i].loss, loss, atol=1e-6, rtol=0)
    model.set_active_adapters(BatchSplit("a", "b", batch_sizes=[1, 2]))
    with pytest.raises(ConfigError, match="add up to the batch size"):
        model(**batch(2, S))


def test_training_through_parallel_reaches_both_adapters_and_heads():
    model = _model()
    model.train_adapter(Parallel("a", "b"))
    out = model(**batch(B, S), labels=torch.tensor([1, 0]))
    torch.testing.assert_close(out.loss, out[0].loss + out[1].loss, atol=0, rtol=0)
    out.loss.backward()
    for part in (model.adapters["a"], model.adapters["b"], model.heads["a"], model.heads["b"]):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.base.parameters())


def test_a_branch_without_a_head_is_refused_before_anything_changes():
    model = _model()
    model.add_adapter("c", "lora")
    model.set_active_adapters("a")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    for setup in (Parallel("a", "c"), BatchSplit("c", "b", batch_sizes=[1, 1])):
        with pytest.raises(ConfigError, match=r"\['c'\] have no head named like them"):
            model.set_active_adapters(setup)
        with pytest.raises(ConfigError, match="add_classification_head"):
            model.train_adapter(setup)
        assert model.active_adapters == Stack("a") and model.active_head == "a" and not model.training
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    # no branch has a head: one active head cannot take two channels
    model.add_adapter("d", "lora")
    with pytest.raises(ConfigError, match="one head per channel"):
        model.set_active_adapters(Parallel("c", "d"))
    assert model.active_adapters == Stack("a")
    model.active_head = None  # without a head, Parallel returns the base model's 2·B rows
    model.set_active_adapters(Parallel("c", "d"))
    assert model(**batch(B, S)).last_hidden_state.shape[0] == 2 * B
    model.set_active_adapters(Parallel("a", "b"))
    with pytest.raises(ConfigError, match="one head per channel"):
        model(**batch(B, S), head="a")
    model.set_active_adapters("a")
    model.active_head = Parallel("a", "b")  # heads per channel need a Parallel of adapters
    with pytest.raises(ConfigError, match="is no Parallel"):
        model(**batch(B, S))


def test_parallel_heads_under_torch_compile_make_one_graph():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = fxadapt.AdaptedModel(make("bert"), compile="whole", compile_options={"backend": backend})
    for name, labels in (("a", 2), ("b", 3)):
        model.add_adapter(name, "lora")
        model.add_classification_head(name, num_labels=labels)
    model.train_adapter(Parallel("a", "b"))
    out = model(**batch(B, S), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert len(graphs) == 1 and [tuple(o.logits.shape) for o in out] == [(B, 2), (B, 3)]


def test_hf_trainer_with_a_head_per_parallel_branch(tmp_path):
    """The HF Trainer trains through Parallel with two heads (the loss is their sum) and predicts one
    output per head, every evaluated row in each."""
    from test_trainer import Parity, _args
    from transformers import Trainer

    torch.manual_seed(0)
    model = fxadapt.AdaptedModel(make("bert"))
    for name in ("a", "b"):
        model.add_adapter(name, "lora")
        model.add_classification_head(name, num_labels=2)
    model.train_adapter(Parallel("a", "b"))
    trainer = Trainer(
        model=model, args=_args(tmp_path), train_dataset=Parity(), eval_dataset=Parity(16, seed=1)
    )
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and evals[1] < evals[0]
    pred = trainer.predict(Parity(16, seed=1))
    assert [tuple(o.logits.shape) for o in pred.predictions] == [(16, 2), (16, 2)]
    assert pred.label_ids.shape == (16,)
