"""One Trainer run on a tiny BERT with a LoRA adapter and a classification head (for the multi-process test).

``python tests/scripts/trainer_run.py OUT BATCH`` trains in one process; under
``torchrun --nproc_per_node 2`` the same script trains with DDP (gloo on CPU), ``BATCH`` per process. The
dataset has exactly one global batch (8 rows) and dropout is off, so every step sees the same rows in
any process layout and one process with batch 8 computes what two with batch 4 compute. Each rank
writes its trainable state to ``OUT/rank<r>.safetensors``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from conftest import make  # noqa: E402

import fxadapt  # noqa: E402


class Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(3, 12, (8, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "label": int(self.ids[i, 0] > 7),
        }


def main(out: str, batch: int) -> None:
    model = fxadapt.AdaptedModel(make("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model.add_adapter("a", "lora")
    model.add_classification_head("a", num_labels=2)
    model.train_adapter("a")
    args = TrainingArguments(
        output_dir=out,
        max_steps=4,
        per_device_train_batch_size=batch,
        learning_rate=1e-2,
        save_steps=4,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows())
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
    print(
        f"rank {rank} world {trainer.args.world_size} losses",
        [h.get("loss") for h in trainer.state.log_history],
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # tear gloo down explicitly: left to interpreter exit, a rank can abort ("terminate called
        # without an active exception") while the other still holds the connection
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
