"""Invertible adapters (Pfeiffer et al., 2020, MAD-X): a coupling block after the input embeddings.

The block (NICE or GLOW, ``coupling.py``) transforms the embedding output; its exact inverse runs
on the input of the LM head, if the model has one. ``SeqBnInvConfig`` and ``DoubleSeqBnInvConfig``
add it to the Pfeiffer and Houlsby bottleneck adapters, as in AdapterHub; any ``BnConfig`` takes it
with ``inv_adapter="nice"|"glow"``.
"""

from __future__ import annotations

import dataclasses

from .config import DoubleSeqBnConfig, SeqBnConfig
from .method import register_preset


@dataclasses.dataclass
class SeqBnInvConfig(SeqBnConfig):
    """AdapterHub's ``SeqBnInvConfig``: Pfeiffer adapters plus a NICE invertible adapter."""

    inv_adapter: str | None = "nice"
    inv_adapter_reduction_factor: float | None = 2


@dataclasses.dataclass
class DoubleSeqBnInvConfig(DoubleSeqBnConfig):
    """AdapterHub's ``DoubleSeqBnInvConfig``: Houlsby adapters plus a NICE invertible adapter."""

    inv_adapter: str | None = "nice"
    inv_adapter_reduction_factor: float | None = 2


SEQ_BN_INV = register_preset("seq_bn_inv", SeqBnInvConfig, "pfeiffer+inv")
DOUBLE_SEQ_BN_INV = register_preset("double_seq_bn_inv", DoubleSeqBnInvConfig, "houlsby+inv")
