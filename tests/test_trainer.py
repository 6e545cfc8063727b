"""The plain HF Trainer on an AdaptedModel, with default TrainingArguments (no remove_unused_columns, no label_names).

The Trainer keeps the dataset columns the model's real signature names (a stray string column is
dropped), finds the labels, trains adapter and head, evaluates with compute_metrics, writes
checkpoints that hold only the trainable parts, and restores them bit for bit
(``load_best_model_at_end``, ``resume_from_checkpoint``). Also gradient accumulation, bf16 autocast and
torch.compile.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import make
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import fxadapt


class Parity(torch.utils.data.Dataset):
    """Label = whether the first token is above the middle of a small vocabulary; a stray text column."""

    def __init__(self, n: int = 64, s: int = 8, seed: int = 0, lm: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 12, (n, s), generator=g)
        self.lm = lm

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "sentence": "not a tensor"}
        if self.lm:
            item["labels"] = ids
        else:
            item["label"] = int(ids[0] > 7)
        return item


def _bert(compile: bool = False, **overrides):
    model = fxadapt.AdaptedModel(make("bert", **overrides), compile=compile)
    model.add_adapter("a", "lora")
    model.add_classification_head("a", num_labels=2)
    model.train_adapter("a")
    return model


def _llama():
    model = fxadapt.AdaptedModel(make("llama", head=True))
    model.add_adapter("a", "lora")
    model.train_adapter("a")
    return model


def _args(out, **kw):
    base = dict(
        output_dir=str(out),
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=4,
        eval_strategy="steps",
        eval_steps=4,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **kw})


def _accuracy(pred) -> dict:
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_trainer_trains_and_checkpoints_only_the_trainable_parts(arch, tmp_path):
    model = _bert() if arch == "bert" else _llama()
    lm = arch == "llama"
    frozen = {k: v.clone() for k, v in model.base.state_dict().items() if not k.startswith("classifier")}
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=32, save_steps=16, eval_steps=16, learning_rate=2e-2),
        train_dataset=Parity(128, lm=lm),
        eval_dataset=Parity(32, seed=1, lm=lm),
        compute_metrics=None if lm else _accuracy,
    )
    assert trainer.label_names == ["labels"]
    trainer.train()
    losses = _losses(trainer)
    first, last = np.mean(losses[:4]), np.mean(losses[-8:])
    assert last < (first - 0.05 if lm else 0.8 * first), losses  # the LM only shifts a frozen LM head
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and (lm or metrics["eval_accuracy"] > 0.7)
    names = sorted(os.listdir(tmp_path / "checkpoint-16"))
    assert names == sorted(
        [
            "model.safetensors",
            "optimizer.pt",
            "rng_state.pth",
            "scheduler.pt",
            "trainer_state.json",
            "training_args.bin",
        ]
    )
    saved = load_file(tmp_path / "checkpoint-16" / "model.safetensors")
    own = ("adapters.a.",) if lm else ("adapters.a.", "heads.a.")
    assert saved and all(k.startswith(own) for k in saved)
    assert (lm or any(k.startswith("heads.a.") for k in saved)) and not any(
        k.startswith("base.") for k in saved
    )
    assert all(torch.equal(v, frozen[k]) for k, v in model.base.state_dict().items() if k in frozen)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_load_best_model_at_end_and_resume_restore_bitwise(arch, tmp_path):
    build = _bert if arch == "bert" else _llama
    lm = arch == "llama"
    data = dict(train_dataset=Parity(64, lm=lm), eval_dataset=Parity(16, seed=1, lm=lm))
    # the highest eval loss is the best here: the first checkpoint, so the restore is visible
    best = dict(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    model = build()
    trainer = Trainer(model=model, args=_args(tmp_path / "a", **best), **data)
    trainer.train()
    best_dir = trainer.state.best_model_checkpoint
    assert best_dir.endswith("checkpoint-4")
    assert _equal(_state(model), load_file(os.path.join(best_dir, "model.safetensors")))

    straight = build()
    Trainer(model=straight, args=_args(tmp_path / "b"), **data).train()
    resumed = build()
    Trainer(model=resumed, args=_args(tmp_path / "c"), **data).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4")
    )
    assert _equal(_state(resumed), _state(straight))
    assert not _equal(_state(resumed), load_file(tmp_path / "b" / "checkpoint-4" / "model.safetensors"))


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    quiet = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    one, two = _bert(**quiet), _bert(**quiet)
    data = Parity(64)
    Trainer(
        model=one,
        args=_args(tmp_path / "1", max_steps=2, eval_strategy="no", save_strategy="no"),
        train_dataset=data,
    ).train()
    args = _args(
        tmp_path / "2",
        max_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        eval_strategy="no",
        save_strategy="no",
    )
    Trainer(model=two, args=args, train_dataset=data).train()
    a, b = _state(one), _state(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_bf16_autocast(tmp_path):
    model = _bert()
    args = _args(tmp_path, max_steps=4, bf16=True, eval_strategy="no", save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=Parity(32))
    trainer.train()
    assert all(np.isfinite(_losses(trainer)))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay fp32


def test_trainer_torch_compile(tmp_path):
    """``torch_compile=True``: the Trainer compiles the AdaptedModel; Dynamo skips its Python dispatch (one
    break before the graph call) and compiles the rewritten graph."""
    torch._dynamo.reset()
    model = _bert()
    args = _args(tmp_path, max_steps=4, eval_steps=4, torch_compile=True)
    trainer = Trainer(model=model, args=args, train_dataset=Parity(32), eval_dataset=Parity(16))
    trainer.train()
    assert all(np.isfinite(_losses(trainer)))
    saved = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    assert all(k.startswith(("adapters.a.", "heads.a.")) for k in saved)
