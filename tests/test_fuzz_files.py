"""Property test of the loaders: a mutated adapter folder loads correctly or raises AdapterFileError.

Random mutations of valid fxadapt, AdapterHub and PEFT folders (truncation, bit flips, renamed,
reshaped or retyped tensors, JSON values replaced by values of other types, JSON keys dropped or
added) must give either an ``AdapterFileError`` from one of fxadapt's checks, with the model exactly
as it was, or a load whose tensors are the file's. Never another exception, never a changed model on
failure. ``FXADAPT_FUZZ_EXAMPLES`` sets the examples per format (CI keeps the default small; the
examples are derandomized, so a run is repeatable).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from adapter_folders import assert_unchanged, make_folders, snapshot
from conftest import make
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import fxadapt
from fxadapt.formats.folder import UNEXPECTED

EXAMPLES = int(os.environ.get("FXADAPT_FUZZ_EXAMPLES", "30"))
KINDS = ["fxadapt", "fxadapt_union", "adapterhub_lora", "adapterhub_seq_bn", "peft"]
MUTATIONS = ["truncate", "flip", "rename", "reshape", "retype", "json_value", "json_drop", "json_add"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**12), max_value=10**12)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_folders(tmp_path_factory.mktemp("valid"))


@pytest.fixture(scope="module")
def model():
    model = fxadapt.AdaptedModel(make("bert"))
    model.add_adapter("keep", fxadapt.LoRAConfig(init_weights="bert"), set_active=True)
    model.add_adapter("merged", fxadapt.IA3Config(init_weights="bert"))
    model.merge_adapter("merged")
    return model


def _weights(folder: Path) -> Path:
    return next(p for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".bin"))


def _read(path: Path) -> dict[str, torch.Tensor]:
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return load_safetensors(data)
    return torch.load(io.BytesIO(data), weights_only=True)


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    if path.suffix == ".safetensors":
        path.write_bytes(save_safetensors(tensors))
    else:
        torch.save(tensors, path)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (dict keys and list indices)."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


def _parent(raw: Any, path: tuple) -> Any:
    for step in path[:-1]:
        raw = raw[step]
    return raw


def _mutate(folder: Path, mutation: str, data: Any) -> None:
    config = folder / "adapter_config.json"
    weights = _weights(folder)
    if mutation in ("truncate", "flip"):
        path = data.draw(st.sampled_from([config, weights]), label="file")
        blob = bytearray(path.read_bytes())
        if mutation == "truncate":
            del blob[data.draw(st.integers(0, len(blob) - 1), label="cut") :]
        else:
            at = data.draw(st.integers(0, len(blob) - 1), label="byte")
            blob[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        path.write_bytes(bytes(blob))
        return
    if mutation in ("rename", "reshape", "retype"):
        tensors = _read(weights)
        key = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
        if mutation == "rename":
            parts = key.split(".")
            new = data.draw(
                st.sampled_from(
                    [".".join(parts[1:]), ".".join(parts[:-1]), key + ".x", key.replace("0", "1")]
                )
                | st.text(max_size=12),
                label="new name",
            )
            tensors[new] = tensors.pop(key)
        elif mutation == "reshape":
            shape = data.draw(st.lists(st.integers(0, 40), max_size=3), label="shape")
            tensors[key] = torch.randn(shape)
        else:
            dtype = data.draw(st.sampled_from([torch.float16, torch.int64, torch.bool, torch.float64]))
            tensors[key] = tensors[key].to(dtype)
        _write(weights, tensors)
        return
    raw = json.loads(config.read_text())
    paths = [p for p in _paths(raw) if p]
    if mutation == "json_value":
        path = data.draw(st.sampled_from(paths), label="json path")
        _parent(raw, path)[path[-1]] = data.draw(json_values, label="value")
    elif mutation == "json_drop":
        path = data.draw(st.sampled_from(paths), label="json path")
        del _parent(raw, path)[path[-1]]
    else:
        dicts = [p for p in [(), *paths] if isinstance(_parent(raw, p + ("",)), dict)]
        where = _parent(raw, data.draw(st.sampled_from(dicts), label="dict") + ("",))
        where[data.draw(st.text(max_size=8), label="key")] = data.draw(json_values, label="value")
    config.write_text(json.dumps(raw))


def _assert_loaded_from_file(model, folder: Path, name: str) -> None:
    """Every tensor of the loaded adapter is one of the file's (cast to the model's dtype)."""
    in_file = list(_read(_weights(folder)).values())
    for key, t in model.adapters[name].site_state().items():
        assert any(f.shape == t.shape and torch.equal(f.to(t.dtype), t) for f in in_file), (
            f"{key} is not a tensor of the file"
        )


@pytest.mark.parametrize("kind", KINDS)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutation=st.sampled_from(MUTATIONS), data=st.data())
def test_mutated_folders_load_or_raise_adapter_file_error(folders, model, kind, mutation, data):
    before = snapshot(model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(folders[kind], Path(tmp) / "a"))
        _mutate(folder, mutation, data)
        try:
            name = model.load_adapter(folder, load_as="fuzzed")
        except fxadapt.AdapterFileError as exc:
            assert UNEXPECTED not in str(exc), f"no check of fxadapt's caught this: {exc!r}"
            assert_unchanged(model, before)
            return
        try:
            _assert_loaded_from_file(model, folder, name)
        finally:
            model.delete_adapter(name)
        assert_unchanged(model, before)
