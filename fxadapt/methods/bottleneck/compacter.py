"""Compacter (Mahabadi et al., 2021): bottleneck adapters whose projections are PHM layers.

``CompacterConfig`` is the Houlsby placement (after attention and FFN), ``CompacterPlusPlusConfig``
the Pfeiffer placement (after the FFN only); both use ``phm_layer=True``, ``reduction_factor=32`` and
GELU, as in AdapterHub. The PHM layers are in ``phm.py``; everything else is the bottleneck method.
"""

from __future__ import annotations

import dataclasses

from .config import DoubleSeqBnConfig, SeqBnConfig
from .method import register_preset


@dataclasses.dataclass
class CompacterConfig(DoubleSeqBnConfig):
    """AdapterHub's ``CompacterConfig``: Houlsby placement with PHM projections."""

    phm_layer: bool = True
    reduction_factor: float | dict[str | int, float] = 32
    non_linearity: str = "gelu"


@dataclasses.dataclass
class CompacterPlusPlusConfig(SeqBnConfig):
    """AdapterHub's ``CompacterPlusPlusConfig``: Pfeiffer placement with PHM projections."""

    phm_layer: bool = True
    reduction_factor: float | dict[str | int, float] = 32
    non_linearity: str = "gelu"


COMPACTER = register_preset("compacter", CompacterConfig)
COMPACTER_PP = register_preset("compacter++", CompacterPlusPlusConfig)
