"""The architecture matrix: every architecture of ``architectures.ARCHS``, built from a tiny config.

Each is captured once (with labels, where its class takes them) and checked against oracles that
are not fxadapt: the HF model's own eval outputs and loss; the roles and fused sections the model's
module layout implies (module names and head layout, written here independently of fxadapt's own
name hints); identity of a fresh LoRA; PEFT's LoRA with the same weights (loaded from PEFT's own
folder); and a training step. An architecture that cannot work yet is a strict expected failure
with its reason.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from architectures import ARCHS, Arch, inputs
from peft import LoraConfig, get_peft_model

import fxadapt

BY_NAME = {a.name: a for a in ARCHS}


def _params(*names: str):
    """One xdist group per architecture: its tests share one capture (``built``), so one worker runs them."""
    return [pytest.param(n, marks=[*_xfail(BY_NAME[n]), pytest.mark.xdist_group(n)]) for n in names]


def _xfail(arch: Arch):
    return [pytest.mark.xfail(reason=arch.xfail, strict=True)] if arch.xfail else []


ALL = _params(*BY_NAME)


@functools.cache
def built(name: str):
    """(HF model, its AdaptedModel, a batch with labels): captured once, shared by the tests."""
    arch = BY_NAME[name]
    hf = arch.build()
    batch = inputs(arch, hf, labels=arch.labels is not None)
    model = fxadapt.AdaptedModel(hf, example_inputs=batch)
    model.sites()
    return hf, model, batch


def _outputs(out) -> dict[str, torch.Tensor]:
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _close(got, expected, atol: float = 1e-5) -> None:
    got, expected = _outputs(got), _outputs(expected)
    assert got.keys() >= expected.keys() - {"past_key_values"}
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, atol=atol, rtol=1e-4, msg=f"output {k!r}")


# ---- the roles and sections the module layout implies ------------------------------------------------
_Q = {"query", "q_proj", "q_lin", "q", "query_proj"}
_K = {"key", "k_proj", "k_lin", "k", "key_proj"}
_V = {"value", "v_proj", "v_lin", "v", "value_proj"}
_QKV = {"c_attn", "query_key_value", "qkv_proj", "Wqkv", "in_proj"}
_O = {"o_proj", "out_proj", "out_lin", "o"}
_FFN_IN = {
    "fc1",
    "up_proj",
    "gate_proj",
    "gate_up_proj",
    "dense_h_to_4h",
    "wi",
    "wi_0",
    "wi_1",
    "lin1",
    "fc_in",
}
_FFN_IN |= {"Wi", "ffn", "c_fc"}
_FFN_OUT = {"fc2", "down_proj", "dense_4h_to_h", "wo", "lin2", "fc_out", "ffn_output"}
_ATTENTION = {"attention", "self_attention", "self_attn", "attn"}


def expected_roles(key: str, expert: bool) -> tuple[str, ...]:
    """The roles of a module path, from transformers' module names (not from fxadapt's hints)."""
    parts = key.split(".")
    if expert:
        parts = parts[:-1]
    last, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
    grand = parts[-3] if len(parts) > 2 else ""
    if not any(p.isdigit() for p in parts) or "adapter_modules" in parts or last.startswith("pos_"):
        return ()
    if last in _Q:
        return ("q",)
    if last in _K:
        return ("k",)
    if last in _V:
        return ("v",)
    if last in _QKV:
        return ("q", "k", "v")
    if last in _O or (last in ("dense", "c_proj", "Wo") and parent in _ATTENTION):
        return ("o",)
    if last == "dense" and parent == "output":
        return ("o",) if grand == "attention" else ("ffn_out",)
    if last == "dense" and parent == "intermediate":
        return ("ffn_in",)
    if last in _FFN_IN:
        return ("ffn_in",)
    if last in _FFN_OUT or (last in ("c_proj", "Wo") and parent == "mlp"):
        return ("ffn_out",)
    return ()


def _heads(cfg) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from a config."""
    hq = next(getattr(cfg, a) for a in ("num_attention_heads", "n_head", "num_heads") if hasattr(cfg, a))
    hidden = next(getattr(cfg, a) for a in ("hidden_size", "n_embd", "d_model") if hasattr(cfg, a))
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    if getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False):
        hkv = 1
    if getattr(cfg, "new_decoder_architecture", False):
        hkv = cfg.num_kv_heads
    return hq, hkv, hidden // hq


FUSED = {"gpt2", "gpt_bigcode", "phi3", "modernbert", "falcon", "gpt_neox", "bloom", "persimmon", "deberta"}
FUSED |= {"falcon_new", "codegen"}


def expected_sections(name: str, cfg) -> list[set[int]] | None:
    """q, k, v columns of a fused projection, from how each model lays its output out."""
    if name not in FUSED:
        return None
    hq, hkv, d = _heads(cfg)
    span = lambda a, b: set(range(a, b))  # noqa: E731
    if name in ("gpt2", "gpt_bigcode", "phi3", "modernbert", "falcon"):  # [q | k | v]
        return [span(0, hq * d), span(hq * d, (hq + hkv) * d), span((hq + hkv) * d, (hq + 2 * hkv) * d)]
    if name in ("gpt_neox", "bloom", "persimmon", "deberta"):  # per head [q_h k_h v_h]
        return [
            set().union(*(span(3 * h * d + i * d, 3 * h * d + (i + 1) * d) for h in range(hq)))
            for i in range(3)
        ]
    if name == "falcon_new":  # per kv group [q_1..q_n k v]
        n = hq // hkv
        out = [set(), set(), set()]
        for g in range(hkv):
            base = g * (n + 2) * d
            out[0] |= span(base, base + n * d)
            out[1] |= span(base + n * d, base + (n + 1) * d)
            out[2] |= span(base + (n + 1) * d, base + (n + 2) * d)
        return out
    if name == "codegen":  # 4 model-parallel chunks [q v k]
        w = hq * d // 4
        return [
            set().union(*(span(3 * w * m + j * w, 3 * w * m + (j + 1) * w) for m in range(4)))
            for j in (0, 2, 1)
        ]
    return None


def _columns(spans) -> set[int]:
    return set().union(*(set(range(a, b)) for a, b in spans))


# ---- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_eval_output_equals_the_hf_model(name):
    hf, model, batch = built(name)
    model.eval()
    with torch.no_grad():
        _close(model(**batch), hf.eval()(**batch))


@pytest.mark.parametrize("name", ALL)
def test_roles_and_sections_follow_the_module_layout(name):
    hf, model, _ = built(name)
    sites = model.sites()
    got = {s.key: s.roles for s in sites}
    want = {s.key: expected_roles(s.key, s.expert is not None) for s in sites}
    assert got == want
    assert {r for roles in got.values() for r in roles} >= {"q", "k", "v", "o", "ffn_in", "ffn_out"}
    fused = [s for s in sites if s.fused]
    sections = expected_sections(name, hf.config)
    assert bool(fused) == (sections is not None)
    for site in fused:
        assert [_columns(site.columns(r)) for r in ("q", "k", "v")] == sections, site.key
    names = {n for n, _ in hf.named_parameters(remove_duplicate=False)}
    for site in sites:
        assert site.weight.removeprefix("base.") in names
        if site.expert is not None:
            assert site.node in {n.name for n in model.graph_module.graph.nodes}


def _peft_targets(model) -> tuple[list[str], list[str]]:
    """PEFT's target_modules and target_parameters for every site that has a role."""
    modules, params = set(), set()
    for s in model.sites():
        if not s.roles:
            continue
        if s.expert is not None:
            params.add(s.weight.removeprefix("base."))
        else:
            modules.add(s.key)
    return sorted(modules), sorted(params)


@pytest.mark.parametrize("name", ALL)
def test_lora_is_the_identity_at_init_and_computes_what_peft_computes(name, tmp_path):
    hf, model, batch = built(name)
    model.eval()
    with torch.no_grad():
        expected = hf.eval()(**batch)
    model.add_adapter(
        "fresh", "lora[attn_matrices=['q','k','v','o'],intermediate_lora=True,output_lora=True]"
    )
    model.set_active_adapters("fresh")
    try:
        with torch.no_grad():
            _close(model(**batch), expected, atol=1e-6)
    finally:
        model.set_active_adapters(None)
        model.delete_adapter("fresh")

    import copy

    modules, params = _peft_targets(model)
    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=modules, target_parameters=params or None, init_lora_weights=False
    )
    peft_model = get_peft_model(copy.deepcopy(hf), config).eval()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.mul_(0.3)
        reference = peft_model(**batch)
    peft_model.save_pretrained(tmp_path)
    name_ = model.load_adapter(tmp_path, load_as="peft", set_active=True)
    try:
        with torch.no_grad():
            got = model(**batch)
        _close(got, reference, atol=2e-5)
        with torch.no_grad():
            base = hf(**batch)
        largest = max(_outputs(reference), key=lambda k: reference[k].numel())
        assert (got[largest] - base[largest]).abs().max() > 1e-4, "the adapter changed nothing"
    finally:
        model.set_active_adapters(None)
        model.delete_adapter(name_)


@pytest.mark.parametrize("name", ALL)
def test_a_training_step(name):
    arch = BY_NAME[name]
    hf, model, batch = built(name)
    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    model.add_adapter("step", "lora[attn_matrices=['q','v'],intermediate_lora=True]")
    try:
        model.train_adapter("step", train_head=False)  # the base model's own weights stay as they are
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable, lr=0.1)
        out = model(**batch)
        loss = out.loss if arch.labels else sum(v.float().pow(2).mean() for v in _outputs(out).values())
        assert torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in trainable if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
        opt.step()
        assert all(p.grad is None for p in hf.parameters())
        for n, p in hf.named_parameters():
            assert torch.equal(p, before[n]), n
    finally:
        model.eval()
        model.delete_adapter("step")
        for p in hf.parameters():
            p.requires_grad_(True)


def test_matrix_covers_at_least_45_architectures():
    assert len(ARCHS) >= 45
    assert len({a.name for a in ARCHS}) == len(ARCHS)
    assert sum(a.xfail is None for a in ARCHS) >= 45
    assert all(re.fullmatch(r"[a-z0-9_]+", a.name) for a in ARCHS)
