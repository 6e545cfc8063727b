"""AdapterHub's per-architecture cases: every adapter AdapterHub 1.3 saved, on every architecture it
supports, computes here what AdapterHub computed after loading it (the oracle is AdapterHub's output).

The cases are in tests/fixtures/adapterhub_arch/ (see its README): one base per architecture, made in
transformers 4.57 with AdapterHub's module names, loaded here in transformers 5. Each architecture is
captured once (eager graphs) and every case is loaded into it, run and deleted again.
"""

from __future__ import annotations

import functools

import adapterhub_arch_cases as cases
import pytest
import torch

import fxadapt

# Cases fxadapt cannot reproduce yet, with the reason (strict: a case that starts to pass must move out).
_T5_BIAS = (
    "AdapterHub computes T5's relative position bias over key positions 0..P+S-1 with the prefix first "
    "(compute_bias(query_length, key_length) in adapters/models/t5/modeling_t5.py), so every real key "
    "is shifted by P relative to the queries: a prefix changes the bias between the real tokens "
    "themselves. fxadapt keeps the real tokens' relative positions (as PEFT does, whose prefix is a "
    "cache before the tokens) and gives the prefix keys no bias; a choice, not a limit"
)
_HOOKED_POST_NORM = (
    "AdapterHub's plugin interface hooks the bottleneck on mlp.down_proj with layer_ln_2 "
    "(post_feedforward_layernorm) as its layer norm, read by a lambda that binds the loop's `layer` "
    "late (adapters/methods/bottleneck.py init_bottleneck): every layer's adapter reads the LAST "
    "layer's norm of h + x (checked on gemma2 in AdapterHub: 0 difference), and the model then applies "
    "its own norm to the adapter's output; fxadapt adapts the layer's own norm of h, then adds x"
)
XFAIL: dict[tuple[str, str], str] = {
    ("t5", "prefix_tuning"): _T5_BIAS,
    ("mt5", "prefix_tuning"): _T5_BIAS,
    ("gemma2", "seq_bn"): _HOOKED_POST_NORM,
    ("gemma3_text", "seq_bn"): _HOOKED_POST_NORM,
    ("deberta_v2", "prompt_tuning"): (
        "AdapterHub pads DeBERTa-v2's [B, 1, S, S] keep mask with 1 on dims 2 and 3 "
        "(prefix_attention_mask(..., prefix_value=1) in adapters/models/deberta_v2/modeling_deberta_v2.py): "
        "the prompt positions' query rows are all 1, so they attend to padding too; fxadapt's prompt "
        "positions see the real tokens only. The row without padding agrees to 5e-7, the padded row's "
        "prompt positions differ by 3e-2"
    ),
    ("distilbert", "prompt_tuning_sdpa"): (
        "AdapterHub pads DistilBERT's 4-D sdpa mask, which is additive (_expand_mask: 0 keep, dtype min "
        "masked), with prefix_value=1 on dims 2 and 3 (adapters/models/distilbert/modeling_distilbert.py:299): "
        "each real query's score for a prompt key gets +1, and the prompt positions' query rows are all 1, "
        "so they attend to padding too; fxadapt gives the prompt an ordinary keep mask (max diff 0.046)"
    ),
    ("gptj", "seq_bn"): (
        "AdapterHub's GPT-J block gives the FFN bottleneck residual + attention output as its residual, "
        "so the adapter reads x + attn + ffn; fxadapt's adapter reads attn + ffn, the first add of HF's "
        "`attn + ffn + x`. Phi's block has the same graph, and there AdapterHub's plugin interface "
        "gives the adapter attn + ffn (phi/seq_bn passes): the two cannot be told apart from the graph"
    ),
    ("modernbert_attnbias", "seq_bn"): (
        "AdapterHub's ModernBERT interface names `mlp` as layer_pre_ffn, so the residual its hooked "
        "bottleneck reads is the MLP's input, mlp_norm(x), not x: the adapter's input is h + mlp_norm(x) "
        "(checked in AdapterHub: 5e-10), while the model adds x; fxadapt's adapter reads h + x (max diff "
        "2.9e-3)"
    ),
}


def _params() -> list:
    return [
        pytest.param(arch, case, id=f"{arch}/{case}", marks=_mark(arch, case))
        for arch, case in cases.made_cases()
    ]


def _mark(arch: str, case: str) -> list:
    reason = XFAIL.get((arch, case))
    return [pytest.mark.xfail(reason=reason, strict=True)] if reason else []


def _attention(arch: str, case: str) -> str:
    return cases.case_info(arch, case).get("attn_implementation") or "eager"


@functools.cache
def adapted(arch: str, attention: str) -> fxadapt.AdaptedModel:
    """The architecture's base, captured once per attention implementation, shared by its cases."""
    case = next(c for a, c in cases.made_cases() if a == arch and _attention(a, c) == attention)
    return fxadapt.AdaptedModel(cases.base_model(arch, case), example_inputs=cases.inputs(arch))


@pytest.mark.parametrize(("arch", "case"), _params())
def test_adapterhub_file_computes_what_adapterhub_computed(arch: str, case: str) -> None:
    info = cases.case_info(arch, case)
    model = adapted(arch, _attention(arch, case))
    try:
        name = model.load_adapter(cases.ROOT / arch / case / "adapter", set_active=True)
        model.eval()
        assert name == info["adapter_name"]
        with torch.no_grad():
            out = model(**cases.inputs(arch))
    finally:
        model.set_active_adapters(None)
        for loaded in list(model.adapters):
            model.delete_adapter(loaded)
    expected = cases.expected(arch, case)
    assert sorted(expected) == sorted(k.removeprefix("expected.") for k in info["outputs"])
    for key, want in expected.items():
        assert out[key].shape == want.shape, key
        diff = (out[key] - want).abs().max().item()
        assert diff <= info["atol"], f"{key}: max abs diff {diff:.3g} > atol {info['atol']}"


def test_every_made_case_is_covered() -> None:
    """Every index entry AdapterHub made is a case here, each case folder is in the index, and the
    expected failures name only made cases."""
    made = {(c["arch"], c["method"]) for c in cases.index()["cases"] if c["status"] == "made"}
    folders = {(p.parent.parent.name, p.parent.name) for p in cases.ROOT.glob("*/*/case.json")}
    assert made == set(cases.made_cases()) == folders
    assert len(made) == 136
    assert set(XFAIL) <= made
