"""The bottleneck method and its presets in the registry, with AdapterHub's names and aliases."""

from __future__ import annotations

from passes.bottleneck import SHARED, insert_bottleneck

from ...registry import Method, register
from .build import build
from .config import (
    AdapterPlusConfig,
    BnConfig,
    DoubleSeqBnConfig,
    ParBnConfig,
    ScaledParBnConfig,
    SeqBnConfig,
)
from .naming import adapterhub_key, adapterhub_name, fill_unsaved_shared


def register_preset(name: str, config: type[BnConfig], *aliases: str) -> Method:
    method = Method(
        name,
        config,
        build,
        insert_bottleneck,
        None,
        adapterhub_key,
        adapterhub_name=adapterhub_name,
        adapterhub_fit=fill_unsaved_shared,
        compose=frozenset({"stack", "average", "rows", "split", "fuse", "route", "drop"}),
        global_keys=(SHARED,),
    )
    return register(method, *aliases)


BOTTLENECK = register_preset("bottleneck", BnConfig)
SEQ_BN = register_preset("seq_bn", SeqBnConfig, "pfeiffer")
DOUBLE_SEQ_BN = register_preset("double_seq_bn", DoubleSeqBnConfig, "houlsby")
PAR_BN = register_preset("par_bn", ParBnConfig, "parallel")
SCALED_PAR_BN = register_preset("scaled_par_bn", ScaledParBnConfig, "scaled_parallel")
ADAPTER_PLUS = register_preset("adapter_plus", AdapterPlusConfig)
