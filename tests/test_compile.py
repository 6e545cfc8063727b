"""Compiled graphs: no graph breaks, no recompiles on new shapes, same numbers as eager."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, compiled_graph_count, make

import fxadapt
from fxadapt import LoRAConfig


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("training", [True, False])
def test_zero_graph_breaks(arch, training):
    config = LoRAConfig(dropout=0.1, output_lora=True)
    assert compiled_graph_count(arch, config, training) == 1
    model = fxadapt.adapt(make(arch, head=True), config, compile=False)
    model.train(training)
    inputs = batch()
    gm = model.graph_for(**inputs)
    explained = torch._dynamo.explain(gm)(*[inputs[n] for n in ("input_ids", "attention_mask")])
    assert explained.graph_break_count == 0


def test_new_batch_size_and_sequence_length_do_not_recompile():
    compiled = []

    def counting_backend(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = fxadapt.adapt(
        make("bert", head=True), "lora", compile="whole", compile_options={"backend": counting_backend}
    )
    for b, s in [(2, 9), (3, 5), (5, 17), (2, 9)]:
        inputs = batch(b, s)
        model(**inputs, labels=torch.zeros(b, dtype=torch.long)).loss.backward()
    assert len(compiled) == 1
    model.eval()
    for b, s in [(2, 9), (4, 6)]:
        model(**batch(b, s))
    assert len(compiled) == 2
    model.add_adapter("other", "lora")  # another adapter does not invalidate this setup's graphs
    model(**batch(3, 7))
    assert len(compiled) == 2


def test_inductor_training_step_matches_eager():
    torch._dynamo.reset()
    base = make("bert", head=True)
    cfg = LoRAConfig(r=4, alpha=16, init_weights="bert")
    eager = fxadapt.adapt(copy.deepcopy(base), cfg, compile=False)
    compiled = fxadapt.adapt(base, cfg, compile=True)
    compiled.adapters.load_state_dict(eager.adapters.state_dict())
    for m in (eager, compiled):
        m.eval()
    inputs, labels = batch(), torch.tensor([0, 1])
    out_e = eager(**inputs, labels=labels)
    out_c = compiled(**inputs, labels=labels)
    torch.testing.assert_close(out_c.logits, out_e.logits, atol=1e-5, rtol=1e-4)
    out_e.loss.backward()
    out_c.loss.backward()
    for (k, pe), (_, pc) in zip(eager.adapters.named_parameters(), compiled.adapters.named_parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, atol=1e-5, rtol=1e-4, msg=k)


def test_compiled_dropout_on_cpu_draws_eager_masks():
    """On CPU inductor draws dropout masks with ATen's generator, so a seeded training-mode call gives
    eager's numbers, gradients included; with inductor's own generator (the user's override) it does not."""
    torch._dynamo.reset()
    base = make("bert", head=True, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    cfg = LoRAConfig(r=4, alpha=16, dropout=0.2, init_weights="bert")
    inputs, labels = batch(), torch.tensor([0, 1])
    models = {
        "eager": fxadapt.adapt(copy.deepcopy(base), cfg, compile=False),
        "compiled": fxadapt.adapt(copy.deepcopy(base), cfg, compile="whole"),
        "own_rng": fxadapt.adapt(
            base, cfg, compile="whole", compile_options={"options": {"fallback_random": False}}
        ),
    }
    outs = {}
    for name, m in models.items():
        if name != "eager":
            m.adapters.load_state_dict(models["eager"].adapters.state_dict())
        m.train()
        torch.manual_seed(7)
        outs[name] = m(**inputs, labels=labels)
        outs[name].loss.backward()
    torch.testing.assert_close(outs["compiled"].logits, outs["eager"].logits, atol=1e-6, rtol=1e-5)
    grads = {n: dict(m.adapters.named_parameters()) for n, m in models.items()}
    for k, p in grads["eager"].items():
        torch.testing.assert_close(grads["compiled"][k].grad, p.grad, atol=1e-6, rtol=1e-5, msg=k)
    assert (outs["own_rng"].logits - outs["eager"].logits).abs().max() > 1e-4


def test_compile_defaults_by_device_and_user_override():
    from fxadapt.compiling import effective_options

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert effective_options({}, cpu) == {"dynamic": True, "options": {"fallback_random": True}}
    assert effective_options({}, cuda) == {"dynamic": True}
    assert effective_options({"dynamic": False, "options": {"fallback_random": False, "x": 1}}, cpu) == {
        "dynamic": False,
        "options": {"fallback_random": False, "x": 1},
    }
    # torch.compile takes either mode or options; another backend gets no inductor options
    assert effective_options({"mode": "max-autotune"}, cpu) == {"dynamic": True, "mode": "max-autotune"}
    assert "options" not in effective_options({"backend": "aot_eager"}, cpu)


def test_compile_options_with_a_non_dict_options_entry_are_refused():
    from fxadapt.errors import ConfigError

    with pytest.raises(ConfigError, match="dict of inductor settings"):
        fxadapt.adapt(make("bert"), "lora", compile="whole", compile_options={"options": ["fallback_random"]})


def test_inductors_cpu_isa_check_runs_once_on_a_thread_before_the_first_compile(monkeypatch):
    import threading
    import time

    import torch._inductor.cpu_vec_isa as vec_isa

    from fxadapt import compiling

    calls = []

    def slow_check():
        time.sleep(0.5)
        calls.append(threading.current_thread().name)

    monkeypatch.setattr(vec_isa, "valid_vec_isa_list", slow_check)
    monkeypatch.setattr(compiling, "_isa_probe", None)
    cpu = torch.device("cpu")
    compiling.start_isa_probe(None, {}, cpu)  # eager: nothing to check
    compiling.start_isa_probe("whole", {"backend": "eager"}, cpu)  # no inductor
    compiling.start_isa_probe("whole", {}, torch.device("meta"))  # not a CPU
    assert compiling._isa_probe is None and calls == []
    gm = fxadapt.adapt(make("bert", head=True), "lora").graph_for(**batch())
    fxadapt.adapt(make("bert", head=True), "lora", compile=True)
    assert compiling._isa_probe is not None
    compiling.start_isa_probe("whole", {}, cpu)  # a second model does not start another
    compiling.compile_graph(gm, "whole", {"backend": "eager"})
    assert not compiling._isa_probe.is_alive()  # waited for before anything compiles
    assert calls == ["fxadapt-isa-probe"]
