"""The demo runs end to end (quick variant, in process) and the command line answers --help."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from fxadapt.cli import demo


def test_quick_demo(tmp_path: Path) -> None:
    out = io.StringIO()
    result = demo.run(quick=True, compile=False, out=tmp_path / "marker", progress=False, stream=out)
    text = out.getvalue()
    for header in (
        "Sites",
        "Rewritten graph",
        "Trainable parameters",
        "Accuracy after",
        "Merge check",
        "Saved adapter",
    ):
        assert f"== {header}" in text
    assert result["accuracy_after"] >= result["accuracy_before"] + 0.2
    assert result["accuracy_after"] >= 0.8
    assert result["merge_max_abs_diff"] < 1e-5
    assert result["reset_max_abs_diff"] == 0.0 and result["reset_exact"]
    assert result["reload_identical"]
    # LoRA on q, k, v, ffn_in, ffn_out of 2 layers: 10 inserted call_module nodes, one per site
    inserted = result["inserted_nodes"]
    assert len(inserted) == 10 and all(d["op"] == "call_module" for d in inserted)
    assert len({d["site"] for d in inserted}) == 10
    weights = tmp_path / "marker" / "adapter.safetensors"
    assert weights.is_file() and weights.stat().st_size > 0
    assert (tmp_path / "marker" / "adapter_config.json").is_file()
    assert result["adapter_sizes"]["adapter.safetensors"] == weights.stat().st_size
    # the adapter and the task head train: 10 sites x (A [8, in] + B [out, 8]) of the quick model
    # (hidden 32, ffn 64), and the classifier [2, 32] + [2] (train_adapter's train_head=True)
    assert result["trainable_params"] == 6 * 8 * (32 + 32) + 2 * 8 * (32 + 64) * 2 + 2 * 32 + 2


def test_module_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fxadapt", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "info" in proc.stdout
