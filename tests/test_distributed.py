"""The Trainer under ``torchrun --nproc_per_node 2`` (DDP, gloo on CPU): same training, same adapter-only checkpoint.

Two processes with batch 4 each compute what one process with batch 8 computes (the script's dataset is
one global batch, dropout is off): the replicas stay identical, and the checkpoint they write holds the
same adapter and head tensors as the single-process one (up to the order of the gradient sum).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "trainer_run.py"
ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], tmp: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_two_processes_train_like_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(SCRIPT), str(one), "8"], tmp_path)
    log = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            str(SCRIPT),
            str(two),
            "4",
        ],
        tmp_path,
    )
    assert "world 2" in log
    ranks = [load_file(two / f"rank{r}.safetensors") for r in (0, 1)]
    assert list(ranks[0]) == list(ranks[1]) and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    single = load_file(one / "checkpoint-4" / "model.safetensors")
    ddp = load_file(two / "checkpoint-4" / "model.safetensors")
    assert sorted(single) == sorted(ddp) and all(k.startswith(("adapters.a.", "heads.a.")) for k in ddp)
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=1e-5, rtol=1e-4)
        assert torch.equal(ddp[k], ranks[0][k])
    files = [{f for f in os.listdir(d / "checkpoint-4") if not f.startswith("rng_state")} for d in (one, two)]
    assert files[0] == files[1]  # rng states are per process (rng_state_<rank>.pth)


def test_fsdp2_sharded_model_trains_like_one_process(tmp_path):
    """``fully_shard`` over the whole AdaptedModel (FSDP2, gloo on CPU), two ranks on half the rows each,
    ends with the trainable state one process reaches on all the rows (docs/training.md)."""
    script = SCRIPT.parent / "fsdp_run.py"
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(script), str(one)], tmp_path)
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534"]
        + [str(script), str(two)],
        tmp_path,
    )
    single, sharded = load_file(one / "state.safetensors"), load_file(two / "state.safetensors")
    assert sorted(single) == sorted(sharded) and all(
        k.startswith(("adapters.a.", "heads.a.")) for k in single
    )
    for k in single:
        torch.testing.assert_close(sharded[k], single[k], atol=1e-5, rtol=1e-4)
    lora_b = [k for k in single if k.endswith("lora_B")]
    assert lora_b and all(single[k].abs().max() > 0 for k in lora_b)  # the steps moved B off its zero init
