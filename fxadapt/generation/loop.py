"""The decoding loop: the prefill graph once, then the one-token decode graph per new token.

Per step it does what transformers' ``GenerationMixin._sample`` does (float32 logits of the last
position, the logits processors, argmax or ``multinomial``, ``pad_token_id`` for finished rows, the
stopping criteria, the streamer), so greedy and seeded sampling give ``generate``'s tokens. The cache
is allocated once per call, exactly as long as the prompt plus the new tokens (plus any positions a
pass put before the prompt, such as prompt tuning's, read off the prefill's keys): the decode graph's
cache length is symbolic, so no length recompiles it.

The number of rows comes from the graphs, not from the call: a setup whose prefill returns ``N·B``
rows for ``B`` prompts (a composition that replicates its input at the graph entry, like AdapterHub's
``Parallel``) decodes ``N·B`` sequences, the prompts repeated block-wise (``_rows``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerateEncoderDecoderOutput

from ..errors import ConfigError
from .config import Setup
from .graphs import Graphs, static_dims


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` for ``rows`` rows: as is, or repeated block-wise when a graph multiplied the batch."""
    if t.shape[0] == rows:
        return t
    if rows % t.shape[0]:
        raise ConfigError(f"the graphs returned {rows} rows for {t.shape[0]} prompts")
    return t.repeat(rows // t.shape[0], *([1] * (t.dim() - 1)))


class _Step:
    """One compiled decode call with its fixed inputs bound: only the token and the positions change."""

    def __init__(self, graphs: Graphs, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        runner = graphs.runner(kind, tensors)
        self.call = graphs.call
        self.fn = runner.fn
        self.args = graphs.inputs(runner, tensors)
        self.static = static_dims(kind, runner.input_names, self.args)
        self.slots = {n: i for i, n in enumerate(runner.input_names)}

    def __call__(self, **changed: torch.Tensor) -> torch.Tensor:
        for name, t in changed.items():
            self.args[self.slots[name]] = t
        (logits,) = self.call(self.fn, self.args, self.static)
        return logits


def _allocate(prefill: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """Self-attention cache tensors of ``length`` positions holding the prefill's keys and values."""
    cache = {}
    for name, t in prefill.items():
        if name.startswith(("key_", "value_")):
            c = t.new_zeros(t.shape[0], t.shape[1], length, t.shape[3])
            c[:, :, : t.shape[2]] = t
            cache[name] = c
    return cache


def decode(graphs: Graphs, setup: Setup, seq2seq: bool, streamer: Any, generator: Any) -> Any:
    """Generate from ``setup``; returns the sequences or, with ``return_dict_in_generate``, generate's output."""
    cfg = setup.config
    ids = setup.input_ids
    if streamer is not None:
        streamer.put(ids.cpu())
    if seq2seq:
        enc = graphs.run("encoder", {"input_ids": setup.inputs, "attention_mask": setup.attention_mask})
        hidden, enc_mask = enc["encoder_hidden_states"], enc["attention_mask"]
        ids = _rows(ids, hidden.shape[0])
        fixed = {"encoder_hidden_states": hidden, "attention_mask": enc_mask}
        prefill = graphs.run("decoder_prefill", {"decoder_input_ids": ids, **fixed})
    else:
        mask = setup.attention_mask
        lengths = mask.sum(-1, keepdim=True)
        offset = graphs.position_offset()  # the real tokens are numbered from here (i - pads + offset)
        prefill_inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            "pads": ids.shape[1] - lengths - offset,
            "lengths": lengths,
        }
        prefill = graphs.run("prefill", prefill_inputs)
    logits = prefill["logits"]
    rows = logits.shape[0]
    ids = _rows(ids, rows)
    written = prefill["key_0"].shape[2]  # the prompt, and any positions a pass put before it
    length = written + cfg.max_length - ids.shape[1] - 1
    if setup.max_cache_len is not None and length > setup.max_cache_len:
        raise ConfigError(
            f"generate(): {written} prompt positions and {cfg.max_length - ids.shape[1]} new tokens need "
            f"a cache of {length} positions; cache_config max_cache_len is {setup.max_cache_len}"
        )
    cache = _allocate(prefill, length)
    if seq2seq:
        cross = {k: v for k, v in prefill.items() if k.startswith("cross_")}
        step = _Step(
            graphs,
            "decoder_decode",
            {
                "decoder_input_ids": ids[:, -1:],
                **fixed,
                "cache_position": torch.tensor(written),
                **cache,
                **cross,
            },
        )
        positions = None
    else:
        mask = _rows(setup.attention_mask, rows)
        front = mask.new_ones(rows, written - mask.shape[1])  # positions a pass put before the prompt
        seen = torch.cat([front, mask], 1)
        positions = mask.sum(-1, keepdim=True) + offset  # the next token's: after the real tokens
        if graphs.positions_follow_prompt(graphs.runner("prefill", prefill_inputs)):
            positions = positions + front.shape[1]
        full = torch.cat([seen, seen.new_ones(rows, length - written)], 1)
        step = _Step(
            graphs,
            "decode",
            {
                "input_ids": ids[:, -1:],
                "attention_mask": full,
                "position_ids": positions,
                "cache_position": torch.tensor(written),
                **cache,
            },
        )
    token_name = "decoder_input_ids" if seq2seq else "input_ids"

    output_dict = cfg.return_dict_in_generate
    scores = () if output_dict and cfg.output_scores else None
    raw_logits = () if output_dict and cfg.output_logits else None
    unfinished = torch.ones(rows, dtype=torch.long, device=ids.device)
    has_eos = any(hasattr(c, "eos_token_id") for c in setup.stopping)
    pad = cfg._pad_token_tensor
    n = 0
    while True:
        next_logits = logits[:, -1].to(copy=True, dtype=torch.float32)
        next_scores = setup.processors(ids, next_logits)
        if scores is not None:
            scores += (next_scores,)
        if raw_logits is not None:
            raw_logits += (next_logits,)
        if cfg.do_sample:
            probs = torch.softmax(next_scores, dim=-1)
            tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        else:
            tokens = torch.argmax(next_scores, dim=-1)
        if has_eos:
            tokens = tokens * unfinished + pad * (1 - unfinished)
        ids = torch.cat([ids, tokens[:, None]], dim=-1)
        unfinished = unfinished & ~setup.stopping(ids, scores)
        if streamer is not None:
            streamer.put(tokens.cpu())
        if unfinished.max() == 0:
            break
        changed = {token_name: tokens[:, None], "cache_position": torch.tensor(written + n)}
        if positions is not None:
            changed["position_ids"] = positions + n
        logits = step(**changed)
        n += 1
    if streamer is not None:
        streamer.end()
    if not output_dict:
        return ids
    if seq2seq:
        return GenerateEncoderDecoderOutput(sequences=ids, scores=scores, logits=raw_logits)
    return GenerateDecoderOnlyOutput(sequences=ids, scores=scores, logits=raw_logits)
