"""Two of docs/reliability.md's promises not covered elsewhere: no code runs from a file; reset is bitwise."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_folders import assert_unchanged, copy_folder, make_folders, snapshot
from conftest import batch, make

import fxadapt


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize(
    "kind, weights", [("adapterhub_lora", "pytorch_adapter.bin"), ("peft", "adapter_model.bin")]
)
def test_a_malicious_pickle_never_runs(tmp_path, kind, weights):
    folder = copy_folder(make_folders(tmp_path / "valid")[kind], tmp_path / "evil")
    for old in folder.glob("*.safetensors"):
        old.unlink()
    marker = tmp_path / "marker"
    torch.save({"x": _Payload(str(marker))}, folder / weights)
    model = fxadapt.AdaptedModel(make("bert"))
    before = snapshot(model)
    with pytest.raises(fxadapt.AdapterFileError, match="could not be read"):
        model.load_adapter(folder)
    assert not marker.exists(), "code in the file ran"
    assert_unchanged(model, before)
    json.loads((folder / "adapter_config.json").read_text())  # the folder was otherwise valid


def test_merges_and_resets_restore_the_base_bitwise():
    base = make("bert")
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = fxadapt.AdaptedModel(base).eval()
    model.add_adapter("l", fxadapt.LoRAConfig(init_weights="bert", attn_matrices=["q", "k", "v"]))
    model.add_adapter("s", fxadapt.IA3Config(init_weights="bert"))  # k and v: the same weights as l
    model.set_active_adapters("l")
    with torch.no_grad():
        unmerged = model(**batch()).last_hidden_state
        model.merge_adapter("l")
        model.merge_adapter("s")  # merged == unmerged is tested per method (test_lora, test_ia3)
    with pytest.raises(fxadapt.ConfigError, match="reset"):
        model.reset_adapter("l")  # s was merged later into the same weights
    model.reset_adapter("s")
    model.reset_adapter("l")
    for k, v in base.state_dict().items():
        assert torch.equal(v, weights[k]), k
    with torch.no_grad():
        assert torch.equal(model(**batch()).last_hidden_state, unmerged)  # l runs unmerged again
