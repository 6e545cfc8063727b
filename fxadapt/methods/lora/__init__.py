"""LoRA: a low-rank update ``y + (alpha/r) · B A x`` beside a projection (Hu et al., 2021).

Config names and defaults follow AdapterHub's ``LoRAConfig``. A fused projection such as GPT-2's
``c_attn`` gets one rank-``r`` block per chosen matrix (AdapterHub's layout, ``fused_qkv="split"``) or
one block over the whole output (PEFT's layout, ``fused_qkv="joint"``). With
``composition_mode="scale"`` the update is a learned rescaling ``y ⊙ (alpha/r) · b`` instead: that
is (IA)^3, whose preset lives in ``methods/ia3.py``.
"""

from __future__ import annotations

from .config import LoRAConfig
from .layer import LoRA, LoRAScale
from .method import LORA, build, fit_sites, fold, select

__all__ = ["LORA", "LoRA", "LoRAConfig", "LoRAScale", "build", "fit_sites", "fold", "select"]
