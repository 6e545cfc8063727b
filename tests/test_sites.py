"""Site finding: roles come from the graph's structure, for several block layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make
from torch import fx, nn

import fxadapt
from passes.sites import find_sites


def roles(model) -> dict[str, tuple[str, ...]]:
    return {s.key: s.roles for s in fxadapt.AdaptedModel(model).sites()}


def test_bert_roles_found_by_structure():
    table = fxadapt.AdaptedModel(make("bert")).sites()
    got = {s.key: s.roles for s in table}
    assert got["encoder.layer.1.attention.self.query"] == ("q",)
    assert got["encoder.layer.1.attention.self.key"] == ("k",)
    assert got["encoder.layer.1.attention.self.value"] == ("v",)
    assert got["encoder.layer.1.attention.output.dense"] == ("o",)
    assert got["encoder.layer.1.intermediate.dense"] == ("ffn_in",)
    assert got["encoder.layer.1.output.dense"] == ("ffn_out",)
    assert got["pooler.dense"] == ()
    assert all(s.found_by == "structure" for s in table if s.layer is not None)
    assert "encoder.layer.0.attention.self.query" in str(table)


def test_bert_eager_attention_roles():
    got = roles(make("bert", attn_implementation="eager"))
    assert got["encoder.layer.0.attention.self.query"] == ("q",)
    assert got["encoder.layer.0.attention.self.value"] == ("v",)
    assert got["encoder.layer.0.attention.output.dense"] == ("o",)


def test_gpt2_fused_c_attn_has_three_sections():
    table = fxadapt.AdaptedModel(make("gpt2")).sites().by_key()
    c_attn = table["h.0.attn.c_attn"]
    assert c_attn.roles == ("q", "k", "v") and c_attn.op == "addmm" and c_attn.transposed
    assert c_attn.sections == (((0, 32),), ((32, 64),), ((64, 96),))
    assert table["h.0.attn.c_proj"].roles == ("o",)
    assert table["h.0.mlp.c_fc"].roles == ("ffn_in",)
    assert table["h.0.mlp.c_proj"].roles == ("ffn_out",)


def test_llama_grouped_query_attention_and_gated_mlp():
    table = fxadapt.AdaptedModel(make("llama")).sites().by_key()
    assert table["layers.0.self_attn.k_proj"].roles == ("k",)
    assert table["layers.0.self_attn.k_proj"].out_features == 16
    assert table["layers.0.self_attn.v_proj"].roles == ("v",)
    assert table["layers.0.mlp.gate_proj"].roles == ("ffn_in",)
    assert table["layers.0.mlp.up_proj"].roles == ("ffn_in",)
    assert table["layers.0.mlp.down_proj"].roles == ("ffn_out",)


def test_bart_encoder_decoder_and_cross_attention():
    got = roles(make("bart"))
    assert got["encoder.layers.0.self_attn.q_proj"] == ("q",)
    assert got["decoder.layers.0.encoder_attn.k_proj"] == ("k",)
    assert got["decoder.layers.0.encoder_attn.out_proj"] == ("o",)
    assert got["decoder.layers.0.fc2"] == ("ffn_out",)


class OddNames(nn.Module):
    """An attention block whose names say nothing: roles must come from structure."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict()])
        blk = self.blocks[0]
        for name, (i, o) in dict(a=(8, 8), b=(8, 8), c=(8, 8), d=(8, 8), e=(8, 16), f=(16, 8)).items():
            blk[name] = nn.Linear(i, o)

    def forward(self, x):
        blk = self.blocks[0]
        q, k, v = (blk[n](x).view(x.shape[0], x.shape[1], 2, 4).transpose(1, 2) for n in "abc")
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        h = x + blk["d"](h)
        return h + blk["f"](F.gelu(blk["e"](h)))


def test_roles_on_a_tiny_graph_with_meaningless_names():
    ep = torch.export.export(OddNames(), (torch.randn(2, 3, 8),))
    table = find_sites(ep.module()).by_key()
    got = {k: v.roles for k, v in table.items()}
    assert got == {
        "blocks.0.a": ("q",),
        "blocks.0.b": ("k",),
        "blocks.0.c": ("v",),
        "blocks.0.d": ("o",),
        "blocks.0.e": ("ffn_in",),
        "blocks.0.f": ("ffn_out",),
    }
    assert table["blocks.0.a"].layer == 0 and table["blocks.0.a"].stack == "blocks"


def test_find_sites_is_pure():
    gm = torch.export.export(OddNames(), (torch.randn(2, 3, 8),)).module()
    before = str(gm.graph)
    find_sites(gm)
    assert str(gm.graph) == before
    assert isinstance(gm, fx.GraphModule)


def test_user_can_override_roles():
    model = fxadapt.AdaptedModel(
        make("bert"), site_roles={r"layer\.0\.attention\.self\.query$": (), "pooler": "o"}
    )
    table = model.sites().by_key()
    assert table["encoder.layer.0.attention.self.query"].roles == ()
    assert table["pooler.dense"].roles == ("o",) and table["pooler.dense"].found_by == "user"
    assert table["encoder.layer.1.attention.self.query"].roles == ("q",)
    with pytest.raises(fxadapt.ConfigError, match="valid roles"):
        fxadapt.AdaptedModel(make("bert"), site_roles={"pooler": "qq"})


def test_sites_are_those_of_the_default_inputs_whatever_the_first_call():
    import torch

    model = fxadapt.AdaptedModel(make("bert", head=True))
    ids = torch.ones(2, 5, dtype=torch.long)
    model(input_ids=ids, labels=torch.zeros(2, dtype=torch.long))
    names = {n.name for n in model.graph_module.graph.nodes}
    assert all(s.node in names for s in model.sites())
