"""Tiny models built from configs (no hub access) shared by the tests."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import (
    BartConfig,
    BartModel,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
)
from transformers.utils import logging

logging.set_verbosity_error()
# fxadapt's disk cache stays out of the tests (tests/test_disk_cache.py points it at a folder of its own)
os.environ["FXADAPT_CACHE_DIR"] = "off"

if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core: a worker's own threads would only contend
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)
GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, bos_token_id=1, eos_token_id=2)
LLAMA = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    vocab_size=100,
)
BART = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    vocab_size=100,
)


def make(arch: str, head: bool = False, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "bert":
        cls = BertForSequenceClassification if head else BertModel
        return cls(BertConfig(**{**BERT, **overrides}))
    if arch == "gpt2":
        return GPT2Model(GPT2Config(**{**GPT2, **overrides}))
    if arch == "llama":
        cls = LlamaForCausalLM if head else LlamaModel
        return cls(LlamaConfig(**{**LLAMA, **overrides}))
    if arch == "bart":
        return BartModel(BartConfig(**{**BART, **overrides}))
    raise ValueError(arch)


def batch(b: int = 2, s: int = 9, pad: int = 3, vocab: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(b * 100 + s)
    ids = torch.randint(3, vocab, (b, s), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[-1, s - pad :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def main_output(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


@pytest.fixture
def clone():
    return copy.deepcopy


def compiled_graph_count(arch: str, config, training: bool, setup=None, mode="whole") -> int:
    """Graphs torch.compile makes of one call (and its backward) of an adapted model: 1 = no break
    when the whole graph compiles (``mode="whole"``); one per distinct layer shape when compiled by region.

    With ``setup`` (a composition block over adapters named ``a``, ``b``, ...), one adapter of
    ``config`` is added per name (and a fusion layer for a ``Fuse``) and the setup is trained.
    """
    import fxadapt

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    if setup is None:
        model = fxadapt.adapt(
            make(arch, head=True), config, compile=mode, compile_options={"backend": counting_backend}
        )
    else:
        model = fxadapt.AdaptedModel(
            make(arch, head=True), compile=mode, compile_options={"backend": counting_backend}
        )
        for name in setup.flatten():
            model.add_adapter(name, config)
        if isinstance(setup, fxadapt.Fuse):
            model.add_adapter_fusion(setup)
            model.train_adapter_fusion(setup)
        else:
            model.train_adapter(setup)
    model.train(training)
    inputs = batch()
    labels = inputs["input_ids"] if arch == "llama" else torch.tensor([0, 1])
    with torch.set_grad_enabled(training):
        out = model(**inputs, labels=labels)
    if training:
        out.loss.backward()
    return len(graphs)
