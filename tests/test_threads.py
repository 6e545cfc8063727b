"""Threads making their first calls at once: one capture at a time, correct outputs, the process left clean."""

from __future__ import annotations

import builtins
import copy
import threading

import torch
from conftest import batch, make
from torch import nn

import fxadapt
from fxadapt import LoRAConfig
from fxadapt.capture import EXPORT_LOCK


def _adapted(hf):
    model = fxadapt.AdaptedModel(hf)
    torch.manual_seed(1)
    model.add_adapter("a", LoRAConfig(init_weights="bert", intermediate_lora=True), set_active=True)
    return model.eval()


def test_first_calls_from_many_threads(tmp_path):
    """Issue 12.3: torch.export is not thread-safe; both first calls failed and left globals patched."""
    patched = (builtins.max, builtins.min, nn.Module.__call__)
    hf = make("bert")
    reference = _adapted(copy.deepcopy(hf))
    model = _adapted(hf)
    b = batch()
    calls = [
        dict(input_ids=b["input_ids"]),
        dict(b),
        dict(b, token_type_ids=torch.zeros_like(b["input_ids"])),
        dict(input_ids=b["input_ids"], output_hidden_states=True),
        dict(b, output_attentions=True),
        dict(b, return_dict=True, output_hidden_states=True),
    ]
    outputs: list = [None] * len(calls)
    errors: list = []
    start = threading.Barrier(len(calls))

    def call(i: int) -> None:
        start.wait()
        try:
            with torch.no_grad():
                outputs[i] = model(**calls[i]).last_hidden_state
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert (builtins.max, builtins.min, nn.Module.__call__) == patched, "torch.export left globals patched"
    assert not hf.training, "a capture switches the base model to training mode: it must switch back"
    with torch.no_grad():  # another thread may split a matmul differently: equal up to rounding
        for out, kwargs in zip(outputs, calls):
            torch.testing.assert_close(out, reference(**kwargs).last_hidden_state, rtol=1e-5, atol=1e-6)


def test_calls_on_built_graphs_run_concurrently():
    """A thread holding the capture lock does not stop calls whose graphs are built."""
    model = _adapted(make("bert"))
    with torch.no_grad():
        expected = model(**batch()).last_hidden_state
    done = threading.Event()
    out: list = []

    def call() -> None:
        with torch.no_grad():
            out.append(model(**batch()).last_hidden_state)
        done.set()

    with EXPORT_LOCK:
        thread = threading.Thread(target=call)
        thread.start()
        assert done.wait(timeout=60), "a call on a built graph waited for the capture lock"
    thread.join()
    assert torch.equal(out[0], expected)
