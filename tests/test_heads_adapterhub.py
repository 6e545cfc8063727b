"""AdapterHub's own head cases: loaded through ``load_adapter``, fxadapt computes AdapterHub's logits and loss.

The cases (``fixtures/adapterhub_heads/``) were made with AdapterHub 1.3.0. A head saved by fxadapt in
AdapterHub's format has AdapterHub's file: the same tensor names, shapes and values, the same config.
``Parallel`` and ``BatchSplit`` with a head per adapter give AdapterHub's ``MultiHeadOutput`` in one call.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import fxadapt
from fxadapt import BatchSplit, Parallel

CASES = Path(__file__).parent / "fixtures" / "adapterhub_heads"
SINGLE = sorted(
    p.name
    for p in CASES.iterdir()
    if (p / "case.json").is_file() and "__head_" in p.name and "parallel" not in p.name
)
MULTI = ["bert_flex__parallel_heads", "bert_flex__batchsplit_heads"]
SETUPS = {  # each case's composition (case.json "composition")
    "bert_flex__parallel_heads": Parallel("a", "b"),
    "bert_flex__batchsplit_heads": BatchSplit("a", "b", batch_sizes=[1, 1]),
}


def _case(name: str):
    folder = CASES / name
    case = json.loads((folder / "case.json").read_text())
    io = load_file(folder / "io.safetensors")
    inputs = {k[len("input.") :]: v for k, v in io.items() if k.startswith("input.")}
    expected = {k[len("expected.") :]: v for k, v in io.items() if k.startswith("expected.")}
    return folder, case, inputs, expected


def _model(folder: Path, case: dict) -> fxadapt.AdaptedModel:
    cls = getattr(transformers, case["model_class"])
    attn = case.get("attn_implementation") or "eager"
    model = fxadapt.AdaptedModel(cls.from_pretrained(folder / "base", attn_implementation=attn))
    for entry in case["load"]:
        model.load_adapter(folder / entry["folder"])
    model.eval()
    return model


def test_the_cases_are_all_here():
    assert len(SINGLE) == 11 and all((CASES / m / "case.json").is_file() for m in MULTI)


@pytest.mark.parametrize("name", SINGLE)
def test_adapterhub_head_case_reproduces(name):
    folder, case, inputs, expected = _case(name)
    model = _model(folder, case)
    assert model.active_head is None  # load_adapter(set_active=False) leaves it off, as AdapterHub does
    model.set_active_adapters("a")  # the head named like the adapter comes with it
    assert model.active_head == "a"
    given = {k: v.clone() for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**given)
    assert set(expected) <= set(out.keys())
    for key, want in expected.items():
        torch.testing.assert_close(getattr(out, key), want, atol=case["atol"], rtol=0)
    for k, v in inputs.items():  # AdapterHub's QA head clamps the positions in place; fxadapt does not
        assert torch.equal(given[k], v)


@pytest.mark.parametrize("name", MULTI)
def test_parallel_and_batchsplit_with_heads_reproduce_adapterhub(name):
    """One call with the composition active: AdapterHub's per-head logits and losses, and their sum."""
    folder, case, inputs, expected = _case(name)
    model = _model(folder, case)
    setup = SETUPS[name]
    assert repr(setup) == case["composition"]
    model.set_active_adapters(setup)  # the heads named like the branches come with it, as in AdapterHub
    assert model.active_head == (["a", "b"] if isinstance(setup, Parallel) else setup)
    with torch.no_grad():
        out = model(**inputs)
    assert isinstance(out, fxadapt.MultiHeadOutput) and len(out) == len(case["head_outputs_order"])
    for i, head in enumerate(case["head_outputs_order"]):
        for key in ("logits", "loss"):
            want = expected[f"head_{head}.{key}"]
            torch.testing.assert_close(getattr(out[i], key), want, atol=case["atol"], rtol=0)
    torch.testing.assert_close(out.loss, expected["loss"], atol=case["atol"], rtol=0)
    calls = [n.target for n in model.graph_for(**inputs).graph.nodes if n.op == "call_module"]
    assert {"heads.a", "heads.b"} <= set(calls)  # both heads in the one graph the call ran


@pytest.mark.parametrize("name", MULTI)
def test_parallel_and_batchsplit_cases_head_by_head(name):
    """Each head with its adapter alone gives AdapterHub's head output; the combined loss is their sum."""
    folder, case, inputs, expected = _case(name)
    model = _model(folder, case)
    labels = inputs.pop("labels")
    rows = {"a": slice(None), "b": slice(None)}
    if "batchsplit" in name:
        rows = {"a": slice(0, 1), "b": slice(1, 2)}
    losses = []
    for head in case["head_outputs_order"]:
        model.set_active_adapters(head)
        part = {k: v[rows[head]] for k, v in inputs.items()}
        with torch.no_grad():
            out = model(**part, labels=labels[rows[head]])
        torch.testing.assert_close(out.logits, expected[f"head_{head}.logits"], atol=case["atol"], rtol=0)
        torch.testing.assert_close(out.loss, expected[f"head_{head}.loss"], atol=case["atol"], rtol=0)
        losses.append(out.loss)
    torch.testing.assert_close(torch.stack(losses).sum(), expected["loss"], atol=case["atol"], rtol=0)


def test_several_active_heads_share_the_outputs():
    """``active_head = ['a', 'b']`` without a composition: both heads on the same outputs, no combined loss."""
    folder, case, inputs, _ = _case("bert_flex__parallel_heads")
    model = _model(folder, case)
    model.active_head = ["a", "b"]
    labels = inputs.pop("labels")
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    assert isinstance(out, fxadapt.MultiHeadOutput) and out.loss is None and len(out) == 2
    assert [tuple(o.logits.shape) for o in out] == [(2, 2), (2, 3)]
    for i, head in enumerate(["a", "b"]):
        with torch.no_grad():
            alone = model(**inputs, labels=labels, head=head)
        torch.testing.assert_close(out[i].logits, alone.logits, atol=0, rtol=0)
        torch.testing.assert_close(out[i].loss, alone.loss, atol=0, rtol=0)


@pytest.mark.parametrize("name", [*SINGLE, "bert_flex__parallel_heads"])
def test_head_written_in_adapterhub_format_is_adapterhubs_file(name, tmp_path):
    folder, case, _, _ = _case(name)
    model = _model(folder, case)
    for entry in case["load"]:
        adapter = entry["name"]
        out = tmp_path / adapter
        model.save_adapter(out, adapter, format="adapterhub")
        theirs = torch.load(folder / entry["folder"] / "pytorch_model_head.bin", weights_only=True)
        ours = torch.load(out / "pytorch_model_head.bin", weights_only=True)
        assert list(ours) == list(theirs)
        for k, v in theirs.items():
            assert ours[k].shape == v.shape and torch.equal(ours[k], v), k
        their_config = json.loads((folder / entry["folder"] / "head_config.json").read_text())
        our_config = json.loads((out / "head_config.json").read_text())
        their_config.pop("model_name"), our_config.pop("model_name")  # where each base was loaded from
        assert our_config == their_config
