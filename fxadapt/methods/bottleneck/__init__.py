"""Bottleneck adapters: ``x + s · up(act(down(x)))`` at a block's residual connection (AdapterHub's family).

``BnConfig`` has every option of AdapterHub's ``BnConfig``; the presets are its subclasses with
AdapterHub's defaults: ``SeqBnConfig`` (Pfeiffer), ``DoubleSeqBnConfig`` (Houlsby), ``ParBnConfig``
(He et al.'s parallel adapter), ``ScaledParBnConfig``, ``AdapterPlusConfig``; Compacter's
presets are in ``compacter.py`` (PHM layers, ``phm.py``) and the invertible ones in
``invertible.py`` (coupling blocks, ``coupling.py``), all in this package.

An adapter sits at the residual step after an attention block (``mh_adapter``, the ``o`` site), a
cross-attention block (``cross_adapter``, the second ``o`` site of a decoder layer) or an FFN
(``output_adapter``, the ``ffn_out`` site). ``passes/bottleneck.py`` replaces that step (the add, and
the layer norm after it in post-LN models) by one module call that computes what AdapterHub's
``bottleneck_layer_forward`` computes: ``pre_forward``, the adapter, ``post_forward``.
"""

from __future__ import annotations

from .build import build, invertible
from .compacter import COMPACTER, COMPACTER_PP, CompacterConfig, CompacterPlusPlusConfig
from .config import (
    AdapterPlusConfig,
    BnConfig,
    DoubleSeqBnConfig,
    ParBnConfig,
    ScaledParBnConfig,
    SeqBnConfig,
)
from .invertible import DOUBLE_SEQ_BN_INV, SEQ_BN_INV, DoubleSeqBnInvConfig, SeqBnInvConfig
from .layer import Bottleneck
from .method import (
    ADAPTER_PLUS,
    BOTTLENECK,
    DOUBLE_SEQ_BN,
    PAR_BN,
    SCALED_PAR_BN,
    SEQ_BN,
    register_preset,
)
from .naming import adapterhub_key, adapterhub_name

__all__ = [
    "ADAPTER_PLUS",
    "BOTTLENECK",
    "COMPACTER",
    "COMPACTER_PP",
    "DOUBLE_SEQ_BN",
    "DOUBLE_SEQ_BN_INV",
    "PAR_BN",
    "SCALED_PAR_BN",
    "SEQ_BN",
    "SEQ_BN_INV",
    "AdapterPlusConfig",
    "BnConfig",
    "Bottleneck",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "DoubleSeqBnConfig",
    "DoubleSeqBnInvConfig",
    "ParBnConfig",
    "ScaledParBnConfig",
    "SeqBnConfig",
    "SeqBnInvConfig",
    "adapterhub_key",
    "adapterhub_name",
    "build",
    "invertible",
    "register_preset",
]
