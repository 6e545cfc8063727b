"""Static HF head models: the task head trains, saves and loads with the adapter; the base stays as it was.

``BertForSequenceClassification``'s ``classifier`` (outside ``model.bert``) is trained by
``train_adapter`` by default, saved beside the adapter and restored by ``load_adapter``; an LM head tied
to the input embeddings stays frozen and is never written.
"""

from __future__ import annotations

import json

import torch
from conftest import batch, make

import fxadapt


def _train(model, steps=3, labels=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        out = model(**batch(), labels=labels if labels is not None else torch.tensor([0, 1]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()


def test_classifier_trains_and_saves_with_the_adapter(tmp_path):
    hf = make("bert", head=True)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    model = fxadapt.AdaptedModel(hf)
    model.add_adapter("a", "lora")
    model.train_adapter("a")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and n.startswith("base."))
    assert trainable == ["base.classifier.bias", "base.classifier.weight"]
    _train(model)
    changed = sorted(k for k, v in hf.state_dict().items() if not torch.equal(v, before[k]))
    assert changed == ["classifier.bias", "classifier.weight"]  # every base weight bitwise unchanged
    assert sorted(k for k in model.state_dict() if k.startswith("base.")) == trainable
    model.save_adapter(tmp_path / "a", "a")
    meta = json.loads((tmp_path / "a" / "head_config.json").read_text())
    assert meta["kind"] == "static" and meta["model_class"] == "BertForSequenceClassification"

    fresh = fxadapt.AdaptedModel(make("bert", head=True))
    fresh.load_adapter(tmp_path / "a", set_active=True)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, fresh(**batch()).logits)
    assert torch.equal(fresh.base.classifier.weight, hf.classifier.weight)

    model.save_adapter(tmp_path / "ah", "a", format="adapterhub")
    theirs = torch.load(tmp_path / "ah" / "pytorch_model_head.bin", weights_only=True)
    assert sorted(theirs) == ["classifier.bias", "classifier.weight"]
    meta = json.loads((tmp_path / "ah" / "head_config.json").read_text())
    assert (
        meta["config"] is None
        and meta["num_labels"] == 2
        and meta["model_class"] == "BertForSequenceClassification"
    )
    again = fxadapt.AdaptedModel(make("bert", head=True))
    again.load_adapter(tmp_path / "ah", set_active=True)
    assert torch.equal(again.base.classifier.weight, hf.classifier.weight)


def test_train_head_false_and_train_embeddings():
    model = fxadapt.AdaptedModel(make("bert", head=True))
    model.add_adapter("a", "lora")
    model.train_adapter("a", train_head=False)
    assert not any(p.requires_grad for p in model.base.parameters())
    model.train_adapter("a", train_embeddings=True)
    assert model.base.bert.embeddings.word_embeddings.weight.requires_grad


def test_tied_lm_head_stays_frozen_and_unsaved(tmp_path):
    hf = make("llama", head=True, tie_word_embeddings=True)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    model = fxadapt.AdaptedModel(hf)
    model.add_adapter("a", "lora")
    model.train_adapter("a")
    assert not any(p.requires_grad for p in model.base.parameters())
    _train(model, labels=batch()["input_ids"])
    assert all(torch.equal(v, before[k]) for k, v in hf.state_dict().items())
    assert not any(k.startswith("base.") for k in model.state_dict())
    model.save_adapter(tmp_path / "a", "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
    ]


def test_untied_lm_head_is_frozen_like_adapterhubs_output_embeddings():
    model = fxadapt.AdaptedModel(make("llama", head=True))
    assert model.base.lm_head.weight is not model.base.model.embed_tokens.weight
    model.add_adapter("a", "lora")
    model.train_adapter("a")
    assert not model.base.lm_head.weight.requires_grad
    model.train_adapter("a", train_embeddings=True)
    assert model.base.lm_head.weight.requires_grad and model.base.model.embed_tokens.weight.requires_grad
