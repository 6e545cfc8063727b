"""ReFT (LoReFT, NoReFT, DiReFT) against a hand-written oracle applied with forward hooks on the HF layers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, main_output, make

import fxadapt
from fxadapt import DiReftConfig, LoReftConfig, NoReftConfig, ReftConfig
from fxadapt.heads.static import task_head
from passes.reft import real_token_bounds

LAYERS = {"bert": "encoder.layer", "gpt2": "h", "llama": "layers"}


def hf_layers(model: torch.nn.Module, arch: str) -> list[torch.nn.Module]:
    mod = model.base_model if arch != "gpt2" else model
    for part in LAYERS[arch].split("."):
        mod = getattr(mod, part)
    return list(mod)


def positions(mask_row, n, p, s):
    """AdapterHub 1.3's prefix and suffix positions of one row, from its attention mask (or None).

    Offset: the row's first 1 (``argmax``); end: offset + number of 1s. Prefix ``offset + i``, suffix
    ``end - s + i``. Positions outside ``[0, n)`` (AdapterHub would fail there) are left out.
    """
    if mask_row is None:
        first, end = 0, n
    else:
        ones = [i for i, m in enumerate(mask_row.tolist()) if m == 1]
        first, end = (ones[0], ones[0] + len(ones)) if ones else (0, 0)
    return [first + i for i in range(p)], [end - s + i for i in range(s)]


def reference(h, units, p, s, tied, subtract, act, mask=None):
    """h + Rᵀ(act(W h + b) − R h) at each row's first p and last s real tokens (AdapterHub's rule)."""

    def unit(x, params):
        w, b, r = params
        src = act(x @ w.T + b)
        if subtract:
            src = src - x @ r.T
        return x + src @ r

    n = h.shape[1]
    out = h.clone()
    for row in range(h.shape[0]):
        pre, suf = positions(None if mask is None else mask[row], n, p, s)
        # a position outside the sequence reads any state (each is adapted on its own) and is not written
        x = h[row, [min(max(q, 0), n - 1) for q in pre + suf]]
        if tied:
            new = unit(x, units[0])
        else:
            new = torch.cat([unit(x[:p], units[0]), unit(x[p:], units[1])])
        for i, pos in enumerate(pre + suf):  # the prefix first: the suffix wins where they overlap
            if 0 <= pos < n:
                out[row, pos] = new[i]
    return out


def oracle(base, arch, adapter, config, inputs):
    """Run ``base`` with the reference intervention hooked onto each adapted layer's output."""
    act = {None: lambda x: x, "tanh": torch.tanh}[config.non_linearity]
    handles = []
    by_layer = dict(adapter.items())
    for i, layer in enumerate(hf_layers(base, arch)):
        key = next((k for k in by_layer if f".{i}." in f".{k}"), None)
        if key is None:
            continue
        units = [
            (u.learned_source.weight.detach(), u.learned_source.bias.detach(), u.projection.weight.detach())
            for u in by_layer[key].units
        ]

        def hook(module, args, output, units=units):
            fn = lambda h: reference(  # noqa: E731
                h,
                units,
                config.prefix_positions,
                config.suffix_positions,
                config.tied_weights,
                config.subtract_projection,
                act,
                inputs.get("attention_mask"),
            )
            return fn(output) if isinstance(output, torch.Tensor) else (fn(output[0]), *output[1:])

        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return main_output(base(**inputs))
    finally:
        for h in handles:
            h.remove()


CONFIGS = [
    LoReftConfig(),
    NoReftConfig(prefix_positions=1, suffix_positions=2, r=2, tied_weights=True),
    DiReftConfig(prefix_positions=2, suffix_positions=2, r=3, non_linearity="tanh"),
    LoReftConfig(prefix_positions=0, suffix_positions=3, r=2, layers=[1]),
]


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__ + str(c.prefix_positions))
def test_matches_hooked_reference_at_two_shapes(arch, config):
    base = make(arch).eval()
    model = fxadapt.adapt(copy.deepcopy(base), config, compile=False).eval()
    adapter = model.adapters[model.active_adapters[0]]
    expect_layers = [1] if config.layers == [1] else [0, 1]
    assert [int(k.split(".")[-3]) for k in adapter.site_keys] == expect_layers
    for b, s in [(2, 9), (3, 6)]:  # one graph (dynamic B, S), right padding in the last row
        inputs = batch(b, s)
        with torch.no_grad():
            got = main_output(model(**inputs))
            plain = main_output(base(**inputs))
        expected = oracle(base, arch, adapter, config, inputs)
        assert (expected - plain).abs().max() > 1e-3
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# right padding, left padding, one real token at either end (prefix and suffix overlap; a position
# falls outside the sequence), no real token at all
EDGE_MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 1],
        [1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 0, 0],
    ]
)


def test_positions_follow_adapterhubs_rule():
    assert positions(EDGE_MASK[1], 7, 2, 2) == ([0, 1], [2, 3])  # right padding: the last real tokens
    assert positions(EDGE_MASK[2], 7, 2, 2) == ([3, 4], [5, 6])  # left padding: the first real tokens
    assert positions(EDGE_MASK[3], 7, 2, 2) == ([0, 1], [-1, 0])
    assert positions(EDGE_MASK[5], 7, 2, 2) == ([0, 1], [-2, -1])
    assert positions(None, 7, 2, 2) == ([0, 1], [5, 6])
    assert real_token_bounds(EDGE_MASK).tolist() == [[0, 7], [0, 4], [3, 7], [0, 1], [6, 7], [0, 0]]
    assert real_token_bounds(EDGE_MASK.bool()).tolist() == real_token_bounds(EDGE_MASK).tolist()


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize(
    "config",
    [
        NoReftConfig(prefix_positions=2, suffix_positions=2, r=2),
        LoReftConfig(suffix_positions=2, tied_weights=True),
    ],
    ids=["noreft", "loreft-tied"],
)
def test_left_padding_and_rows_shorter_than_the_positions(arch, config):
    base = make(arch).eval()
    model = fxadapt.adapt(copy.deepcopy(base), config, compile=False).eval()
    adapter = model.adapters[model.active_adapters[0]]
    ids = torch.randint(3, 100, EDGE_MASK.shape, generator=torch.Generator().manual_seed(0))
    for inputs in ({"input_ids": ids, "attention_mask": EDGE_MASK}, {"input_ids": ids}):
        with torch.no_grad():
            got = main_output(model(**inputs))
        expected = oracle(base, arch, adapter, config, inputs)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # without a mask the positions are the ends of the sequence: an all-ones mask gives the same
    ones = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**ones)), main_output(model(input_ids=ids)))


def test_the_mask_is_read_once_and_only_for_layers_of_its_length():
    model = fxadapt.adapt(make("bart"), LoReftConfig(suffix_positions=1), compile=False).eval()
    inputs = batch()
    inputs["decoder_input_ids"] = inputs["input_ids"][:, :5]
    graph = model.graph_for(**inputs).graph
    reft = [n for n in graph.nodes if n.meta.get("fxadapt", {}).get("kind") == "reft"]
    bounds = [n for n in graph.nodes if n.target is real_token_bounds]
    assert len(reft) == 2 and len(bounds) == 1
    # the encoder layer reads the input's mask; the decoder layer (another length, no mask of its own)
    # takes the ends of its sequence
    assert [len(n.args) for n in reft] == [2, 1] and reft[0].args[1] is bounds[0]
    inputs["decoder_attention_mask"] = torch.ones_like(inputs["decoder_input_ids"])
    graph = model.graph_for(**inputs).graph
    bounds = [n for n in graph.nodes if n.target is real_token_bounds]
    assert len(bounds) == 2


def test_loreft_projection_is_orthonormal_and_direft_with_zero_source_is_identity():
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("lo", LoReftConfig(r=4))
    for _, module in model.adapters["lo"].items():
        for unit in module.units:
            r = unit.projection.weight
            torch.testing.assert_close(r @ r.T, torch.eye(4), atol=1e-5, rtol=0)
    base = make("llama").eval()
    model = fxadapt.adapt(copy.deepcopy(base), DiReftConfig(suffix_positions=2), compile=False).eval()
    with torch.no_grad():
        assert (main_output(model(**batch())) - main_output(base(**batch()))).abs().max() > 1e-3
        for _, module in model.adapters["direft"].items():
            for unit in module.units:
                unit.learned_source.weight.zero_()
                unit.learned_source.bias.zero_()
        assert torch.equal(main_output(model(**batch())), main_output(base(**batch())))


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("method", ["loreft", "noreft", "direft"])
def test_training_lowers_loss_and_leaves_base_alone(arch, method):
    base = make(arch, head=True, initializer_range=0.2)
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    config = fxadapt.resolve_config(method).replace(r=4, dropout=0.0, suffix_positions=1)
    model = fxadapt.adapt(base, config, compile=False)
    # weight_decay=0: decoupled decay moves the ±1 diagonal of the orthogonal parametrization's
    # `original`, which torch's householder map reads with .int(), and zeroes R (docs/methods.md)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    inputs = batch(8, 12, pad=0)
    target = torch.randn(8, 12, 32, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(20):
        if arch == "bert":
            loss = model(**inputs, labels=torch.tensor([0, 1] * 4)).loss
        elif arch == "llama":
            loss = model(**inputs, labels=inputs["input_ids"]).loss
        else:  # GPT2Model has no head: regress the hidden states of the first (intervened) positions
            loss = (model(**inputs).last_hidden_state[:, :3] - target[:, :3]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    head = set(task_head(base))
    for k, v in base.state_dict().items():
        assert k in head or torch.equal(v, before[k]), k  # a static task head trains too


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("training", [True, False])
def test_zero_graph_breaks(arch, training):
    model = fxadapt.adapt(make(arch, head=True), LoReftConfig(suffix_positions=2), compile=False)
    model.train(training)
    inputs = batch()
    gm = model.graph_for(**inputs)
    explained = torch._dynamo.explain(gm)(*[inputs[n] for n in ("input_ids", "attention_mask")])
    assert explained.graph_break_count == 0


def test_compiled_new_shapes_do_not_recompile_and_match_eager():
    compiled = []

    def counting_backend(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    torch._dynamo.reset()
    base = make("bert")
    config = LoReftConfig(suffix_positions=2, dropout=0.0)
    eager = fxadapt.adapt(copy.deepcopy(base), config, compile=False).eval()
    model = fxadapt.adapt(base, config, compile="whole", compile_options={"backend": counting_backend}).eval()
    model.adapters.load_state_dict(eager.adapters.state_dict())
    for b, s in [(2, 9), (3, 5), (4, 11)]:
        with torch.no_grad():
            torch.testing.assert_close(
                main_output(model(**batch(b, s))), main_output(eager(**batch(b, s))), atol=1e-6, rtol=0
            )
    assert len(compiled) == 1


@pytest.mark.parametrize("method", ["loreft", "direft"])
def test_save_load_roundtrip_is_bitwise(tmp_path, method):
    model = fxadapt.AdaptedModel(make("gpt2"))
    model.add_adapter("a", fxadapt.resolve_config(method).replace(suffix_positions=2, r=2), set_active=True)
    with torch.no_grad():  # move away from the init, so that loading must restore the values
        for p in model.adapters["a"].parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_adapter(tmp_path, "a")
    other = fxadapt.AdaptedModel(make("gpt2"))
    name = other.load_adapter(tmp_path, load_as="b", set_active=True)
    other.eval()
    assert type(other.adapters[name].config) is type(model.adapters["a"].config)
    assert other.adapters[name].config == model.adapters["a"].config
    saved, loaded = model.adapters["a"].site_state(), other.adapters[name].site_state()
    assert saved.keys() == loaded.keys()
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k
    with torch.no_grad():
        assert torch.equal(main_output(model(**batch())), main_output(other(**batch())))


@pytest.mark.parametrize(
    "bad",
    [
        dict(r=0),
        dict(r=1.5),
        dict(prefix_positions=-1),
        dict(suffix_positions="2"),
        dict(prefix_positions=0, suffix_positions=0),
        dict(dropout=1.0),
        dict(layers="some"),
        dict(layers=[-1]),
        dict(orthogonality="yes"),
        dict(non_linearity="nope"),
        dict(dtype="float99"),
        dict(tied_weights=1),
    ],
)
def test_bad_config_values_raise(bad):
    with pytest.raises(fxadapt.ConfigError):
        LoReftConfig(**bad)


def test_bad_values_against_the_model_raise():
    model = fxadapt.AdaptedModel(make("bert"))
    with pytest.raises(fxadapt.ConfigError, match="not in this model"):
        model.add_adapter("x", LoReftConfig(layers=[5]))
    with pytest.raises(fxadapt.ConfigError, match="larger than the hidden size"):
        model.add_adapter("x", NoReftConfig(r=33))
    with pytest.raises(fxadapt.ConfigError, match="only init_weights_seed=None"):
        ReftConfig.from_dict({"architecture": "reft", "init_weights_seed": 3})


def test_adapterhub_config_dict_and_names():
    config = ReftConfig.from_dict(
        {"architecture": "reft", "layers": "all", "r": 2, "output_reft": True, "init_weights_seed": None}
    )
    assert config.orthogonality and config.subtract_projection
    assert DiReftConfig().orthogonality is False and DiReftConfig().subtract_projection is False
    assert {"reft", "loreft", "noreft", "direft"} <= set(fxadapt.method_names())
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("x", LoReftConfig())
    names = set(model.adapters["x"].site_state())
    assert "encoder.layer.0.output.dense.units.1.projection.parametrizations.weight.original" in names
    from fxadapt.methods.reft import adapterhub_key

    key = "bert.encoder.layer.1.reft_layer.refts.x.units.0.learned_source.weight"
    assert adapterhub_key(key, model.sites()) == "encoder.layer.1.output.dense.units.0.learned_source.weight"
