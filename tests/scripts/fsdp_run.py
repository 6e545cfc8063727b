"""Three training steps of a tiny BERT with LoRA and a head, in one process or sharded with FSDP2.

``python tests/scripts/fsdp_run.py OUT`` trains in one process on the whole batch (8 rows); under
``torchrun --nproc_per_node 2`` the AdaptedModel is sharded as one unit with ``fully_shard`` (gloo on
CPU) and each rank trains on its half of the rows. Dropout is off and the optimizer is plain AdamW, so
both layouts compute the same steps. Rank 0 (or the single process) writes the trainable state, the
shards gathered, to ``OUT/state.safetensors``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from conftest import make  # noqa: E402

import fxadapt  # noqa: E402


def main(out: str) -> None:
    sharded = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if sharded:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = fxadapt.AdaptedModel(make("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model.add_adapter("a", "lora")
    model.add_classification_head("a", num_labels=2)
    model.train_adapter("a")
    ids = torch.randint(3, 12, (8, 8), generator=torch.Generator().manual_seed(0))
    labels = (ids[:, 0] > 7).long()
    rows = slice(None)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)  # one unit: the graph reads the parameters, not the layers' forward
        rank = dist.get_rank()
        rows = slice(4 * rank, 4 * rank + 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        out_ = model(input_ids=ids[rows], attention_mask=torch.ones_like(ids[rows]), labels=labels[rows])
        out_.loss.backward()
        opt.step()
        opt.zero_grad()
    state = {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().contiguous()
        for k, v in model.state_dict().items()
    }
    if not sharded or dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        save_file(state, os.path.join(out, "state.safetensors"))
    if sharded:
        dist.barrier()  # no rank tears gloo down while another still uses it
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # gloo's threads can abort the interpreter's own teardown ("terminate called ...")


if __name__ == "__main__":
    main(sys.argv[1])
