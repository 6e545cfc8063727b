"""The disk cache: a second process's captures load from disk, and a stale or broken entry is rebuilt."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import batch, make

import fxadapt
from fxadapt import LoRAConfig, cache


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "fxadapt"))
    cache.stats.clear()
    return tmp_path / "fxadapt"


def _step(model):
    """Outputs and adapter gradients of one training call (no dropout in these models)."""
    inputs = batch(3, 7)
    out = model(**inputs, labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.adapters.named_parameters()}
    return out.logits.detach(), grads


def _model(**overrides):
    overrides = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **overrides}
    return make("bert", head=True, **overrides)


def _adapt(base):
    return fxadapt.adapt(base, LoRAConfig(init_weights="bert"), compile=False)


def test_a_second_model_loads_its_captures_from_disk_with_the_same_numbers(folder):
    base = _model()
    first = _adapt(copy.deepcopy(base))
    expected = _step(first)
    assert cache.stats["capture_hit"] == 0 and cache.stats["capture_saved"] == 2  # default call, labels call
    assert len(list((folder / "captures").glob("*.pt2"))) == 2
    second = _adapt(base)
    second.adapters.load_state_dict(first.adapters.state_dict())
    logits, grads = _step(second)
    assert cache.stats["capture_hit"] == 2
    torch.testing.assert_close(logits, expected[0], rtol=0, atol=0)
    for k, g in expected[1].items():
        torch.testing.assert_close(grads[k], g, rtol=0, atol=0, msg=k)
    # the loaded graph runs on the model's own weights, not on the stand-ins stored on disk
    params = {id(p) for p in base.parameters()}
    gm = second.graph_for(**batch())
    reads = [n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("base.")]
    assert reads and all(id(second.get_parameter(t)) in params for t in reads if t.endswith("weight"))


def test_another_config_or_version_does_not_use_the_entry(folder, monkeypatch):
    _adapt(_model())
    saved = cache.stats["capture_saved"]
    _adapt(_model(intermediate_size=48))  # another config: another key
    assert cache.stats["capture_hit"] == 0 and cache.stats["capture_saved"] == saved + 1
    versions = cache._versions()
    monkeypatch.setattr(cache, "_versions", lambda: {**versions, "torch": "0.0.0"})
    _adapt(_model())
    assert cache.stats["capture_hit"] == 0 and cache.stats["capture_saved"] == saved + 2


def test_a_corrupt_entry_is_rebuilt_and_never_trusted(folder):
    base = _model()
    first = _adapt(copy.deepcopy(base))
    expected = _step(first)
    for path in (folder / "captures").glob("*.pt2"):
        path.write_bytes(path.read_bytes()[:1000])  # truncated
    model = _adapt(copy.deepcopy(base))
    model.adapters.load_state_dict(first.adapters.state_dict())
    assert cache.stats["capture_rebuilt"] >= 1 and cache.stats["capture_hit"] == 0
    torch.testing.assert_close(_step(model)[0], expected[0], rtol=0, atol=0)
    cache.stats.clear()
    _adapt(copy.deepcopy(base))  # the rebuilt entry is sound again
    assert cache.stats["capture_hit"] == 1


def test_an_entry_whose_weights_do_not_match_the_model_is_rebuilt(folder):
    _adapt(_model())
    (key,) = [p.stem for p in (folder / "captures").glob("*.pt2")]
    other = folder / "other"
    other.mkdir()
    # an entry recorded for a wider model, under this model's key
    os.environ[cache.ENV] = str(other)
    _adapt(_model(hidden_size=48))
    (wide,) = list((other / "captures").glob("*.pt2"))
    os.environ[cache.ENV] = str(folder)
    wide.replace(folder / "captures" / f"{key}.pt2")
    cache.stats.clear()
    _adapt(_model())
    assert cache.stats["capture_rebuilt"] == 1 and cache.stats["capture_hit"] == 0


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, "off")
    assert cache.folder() is None
    monkeypatch.delenv(cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.folder() == tmp_path / "fxadapt"


def test_compiled_artefacts_are_stored_after_a_step_and_loaded_by_the_next_model(folder):
    torch._dynamo.reset()
    model = fxadapt.adapt(_model(), LoRAConfig(), compile=True)
    for _ in range(2):
        model(**batch(), labels=torch.tensor([0, 1])).loss.backward()
    (stored,) = list((folder / "compiled").glob("*.bin"))
    assert stored.stat().st_size > 0 and cache.stats["compiled_saved"] == 1
    fxadapt.adapt(_model(), LoRAConfig(), compile=True)
    assert cache.stats["compiled_loaded"] == 1
    stored.write_bytes(b"not an artefact")
    fxadapt.adapt(_model(), LoRAConfig(), compile=True)  # a broken file is dropped, not trusted
    assert cache.stats["compiled_loaded"] == 1 and not stored.exists()


def test_a_model_that_cannot_be_keyed_is_captured_without_the_cache(folder, monkeypatch):
    def unserialisable(model):
        raise TypeError("Object of type Thing is not JSON serializable")

    monkeypatch.setattr(cache, "model_key", unserialisable)
    model = _adapt(_model())
    model(**batch(), labels=torch.tensor([0, 1]))
    assert cache.stats["capture_saved"] == 0 and not (folder / "captures").exists()
