"""AdapterHub's ``AdapterModelInterface``, accepted as it is: sites pinned by module path.

Oracles: a plain-PyTorch LoRA written into the model by hand (same weights) for a model whose names
and structure mislead automatic detection, and fxadapt's own automatic detection on Gemma-2, where
it is right, with AdapterHub's published Gemma-2 interface.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import batch
from torch import nn
from transformers import Gemma2Config, Gemma2Model

import fxadapt
from fxadapt import AdapterModelInterface, ConfigError, LoRAConfig

D, HEADS, FF, VOCAB = 16, 2, 24, 50


class Mixer(nn.Module):
    """Linear attention (no softmax) with meaningless names: a, b, c are q, k, v and d the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(bsz, seq, HEADS, D // HEADS).transpose(1, 2)

        q, k, v = F.elu(heads(self.a(x))) + 1, F.elu(heads(self.b(x))) + 1, heads(self.c(x))
        k = k * mask[:, None, :, None]
        ctx = (q @ (k.transpose(-1, -2) @ v)) / seq
        return self.d(ctx.transpose(1, 2).reshape(bsz, seq, D))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = Mixer()
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.p1, self.p2 = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.n1(x), mask)
        return x + self.p2(F.gelu(self.p1(self.n2(x))))


class Odd(nn.Module):
    """A non-Hugging Face model: ``trunk.emb`` and ``trunk.blocks.<i>``."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Module()
        self.trunk.emb = nn.Embedding(VOCAB, D)
        self.trunk.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.trunk.emb(input_ids)
        mask = attention_mask.to(x.dtype)
        for block in self.trunk.blocks:
            x = block(x, mask)
        return x


ODD_INTERFACE = AdapterModelInterface(
    adapter_methods=["lora", "bottleneck"],
    model_embeddings="emb",
    model_layers="blocks",
    layer_self_attn="mix",
    layer_cross_attn=None,
    attn_q_proj="a",
    attn_k_proj="b",
    attn_v_proj="c",
    attn_o_proj="d",
    layer_intermediate_proj="p1",
    layer_output_proj="p2",
    layer_ln_1="n1",
    layer_ln_2="n2",
    base_model="trunk",
)

# AdapterHub's own interface for Gemma-2 (adapters/wrappers/interfaces.py)
GEMMA2_INTERFACE = AdapterModelInterface(
    adapter_methods=["bottleneck", "lora", "reft", "invertible"],
    model_embeddings="embed_tokens",
    model_layers="layers",
    layer_self_attn="self_attn",
    layer_cross_attn=None,
    attn_k_proj="k_proj",
    attn_q_proj="q_proj",
    attn_v_proj="v_proj",
    attn_o_proj="o_proj",
    layer_intermediate_proj="mlp.up_proj",
    layer_output_proj="mlp.down_proj",
    layer_pre_self_attn="input_layernorm",
    layer_pre_cross_attn=None,
    layer_pre_ffn="pre_feedforward_layernorm",
    layer_ln_1="post_attention_layernorm",
    layer_ln_2="post_feedforward_layernorm",
)


def _odd() -> Odd:
    torch.manual_seed(0)
    return Odd().eval()


def _inputs() -> dict[str, torch.Tensor]:
    return batch(vocab=VOCAB)


class _HandLoRA(nn.Module):
    """The oracle: ``W x + b + (alpha/r) B A x`` in plain PyTorch."""

    def __init__(self, linear: nn.Linear, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.linear, self.a, self.b, self.scaling = linear, a.detach().clone(), b.detach().clone(), scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + (x @ self.a.T @ self.b.T) * self.scaling


def test_misleading_model_needs_the_interface() -> None:
    """Without the interface no q/v site is found (the detection is honest about it)."""
    model = fxadapt.AdaptedModel(_odd(), example_inputs=_inputs())
    roles = {s.key: s.roles for s in model.sites()}
    assert roles["trunk.blocks.0.mix.a"] != ("q",)
    with pytest.raises(ConfigError, match="found no site"):
        model.add_adapter("x", LoRAConfig(attn_matrices=["q", "v"]))


def test_interface_pins_roles_and_lora_matches_a_hand_written_lora() -> None:
    model = fxadapt.AdaptedModel(_odd(), example_inputs=_inputs(), interface=ODD_INTERFACE)
    by_key = model.sites().by_key()
    expected = {"a": ("q",), "b": ("k",), "c": ("v",), "d": ("o",), "p1": ("ffn_in",), "p2": ("ffn_out",)}
    for layer in (0, 1):
        for name, role in expected.items():
            path = f"trunk.blocks.{layer}.{'mix.' if name in 'abcd' else ''}{name}"
            site = by_key[path]
            assert (site.roles, site.layer, site.stack, site.found_by) == (
                role,
                layer,
                "trunk.blocks",
                "interface",
            )
    config = LoRAConfig(r=4, alpha=8, attn_matrices=["q", "v"], init_weights="bert")
    model.add_adapter("x", config, set_active=True)
    model.eval()
    got = model(**_inputs())

    oracle = copy.deepcopy(model.base)
    for key, module in model.adapters["x"].items():
        parent_path, _, attr = key.rpartition(".")
        parent = oracle.get_submodule(parent_path)
        setattr(parent, attr, _HandLoRA(getattr(parent, attr), module.lora_A, module.lora_B, config.scaling))
    assert sorted(k.rsplit(".", 1)[1] for k, _ in model.adapters["x"].items()) == ["a", "a", "c", "c"]
    want = oracle(**_inputs())
    assert (got - want).abs().max() < 1e-6
    assert (want - model.base(**_inputs())).abs().max() > 1e-3  # the adapter changes the output


def test_interface_places_bottlenecks_at_the_named_outputs() -> None:
    model = fxadapt.AdaptedModel(_odd(), example_inputs=_inputs(), interface=ODD_INTERFACE)
    model.add_adapter("bn", fxadapt.DoubleSeqBnConfig(init_weights="mam_adapter"), set_active=True)
    keys = [k for k, _ in model.adapters["bn"].items()]
    assert keys == [f"trunk.blocks.{i}.{p}" for i in (0, 1) for p in ("mix.d", "p2")]
    model.eval()
    assert (model(**_inputs()) - model.base(**_inputs())).abs().max() < 1e-6  # identity at this init


def _gemma2() -> Gemma2Model:
    torch.manual_seed(0)
    config = Gemma2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        vocab_size=100,
        attn_implementation="eager",
    )
    return Gemma2Model(config).eval()


def test_gemma2_interface_agrees_with_detection() -> None:
    base = _gemma2()
    auto = fxadapt.AdaptedModel(base)
    pinned = fxadapt.AdaptedModel(copy.deepcopy(base), interface=GEMMA2_INTERFACE)
    auto_roles = {s.key: (s.roles, s.layer) for s in auto.sites() if s.layer is not None}
    pinned_roles = {s.key: (s.roles, s.layer) for s in pinned.sites() if s.layer is not None}
    for key, (roles, layer) in pinned_roles.items():
        if key.endswith("gate_proj"):  # AdapterHub's interface names up_proj only
            assert roles == ()
        else:
            assert (roles, layer) == auto_roles[key], key
    config = LoRAConfig(r=2, attn_matrices=["q", "k", "v", "o"], intermediate_lora=True, init_weights="bert")
    torch.manual_seed(1)
    auto.add_adapter("x", config, set_active=True)
    pinned.add_adapter("x", config, set_active=True)
    pinned.adapters["x"].load_state_dict(
        {k: v for k, v in auto.adapters["x"].state_dict().items() if "gate_proj" not in k}
    )
    inputs = batch()
    auto.eval()
    pinned.eval()
    mask = inputs["attention_mask"].bool()
    got, want = pinned(**inputs).last_hidden_state, auto.__class__(copy.deepcopy(base))
    want.add_adapter("x", config.replace(), set_active=True)
    want.adapters["x"].load_state_dict(auto.adapters["x"].state_dict())
    for key, module in want.adapters["x"].items():  # the interface leaves gate_proj alone: so does the oracle
        if key.endswith("gate_proj"):
            module.lora_B.data.zero_()
    want.eval()
    ref = want(**inputs).last_hidden_state
    assert (got - ref)[mask].abs().max() < 1e-5
    assert (ref - base(**inputs).last_hidden_state)[mask].abs().max() > 1e-3


def test_gemma2_interface_bottleneck_and_refused_method() -> None:
    model = fxadapt.AdaptedModel(_gemma2(), interface=GEMMA2_INTERFACE)
    model.add_adapter("bn", fxadapt.DoubleSeqBnConfig(init_weights="mam_adapter"), set_active=True)
    keys = [k for k, _ in model.adapters["bn"].items()]
    assert keys == [f"layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.o_proj", "mlp.down_proj")]
    model.eval()
    inputs = batch()
    mask = inputs["attention_mask"].bool()
    assert (model(**inputs).last_hidden_state - model.base(**inputs).last_hidden_state)[
        mask
    ].abs().max() < 1e-5
    with pytest.raises(ConfigError, match=r"adapter_methods.*prefix_tuning"):
        model.add_adapter("p", "prefix_tuning")
    assert list(model.adapters) == ["bn"]


def test_interface_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match="attn_qkv_proj"):
        AdapterModelInterface(
            adapter_methods=["lora"],
            model_embeddings="emb",
            model_layers="blocks",
            layer_self_attn="mix",
            layer_cross_attn=None,
            attn_o_proj="d",
            layer_intermediate_proj="p1",
            layer_output_proj="p2",
        )
    with pytest.raises(ConfigError, match="adapter_methods"):
        AdapterModelInterface(**{**ODD_INTERFACE.to_dict(), "adapter_methods": ["loha"]})
    wrong = AdapterModelInterface(**{**ODD_INTERFACE.to_dict(), "model_layers": "layers"})
    with pytest.raises(ConfigError, match="model_layers names module 'trunk.layers'"):
        fxadapt.AdaptedModel(_odd(), example_inputs=_inputs(), interface=wrong)
    typo = AdapterModelInterface(**{**ODD_INTERFACE.to_dict(), "attn_q_proj": "qq"})
    model = fxadapt.AdaptedModel(_odd(), example_inputs=_inputs(), interface=typo)
    with pytest.raises(ConfigError, match=r"mix\.qq"):
        model.sites()
