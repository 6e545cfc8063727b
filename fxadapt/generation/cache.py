"""The KV cache as graph tensors: Hugging Face cache layers over tensors the captured graph takes as inputs.

A decode graph takes each layer's keys and values ``[B, kv_heads, L, head_dim]`` as inputs and writes
the step's keys and values into them in place (``index_copy_`` at the cache position), as
transformers' ``StaticLayer`` does; the model's own code (rotary positions, masks, cross-attention)
runs unchanged because it sees an ordinary ``Cache``. ``L`` is a symbolic size of the captured graph, so
one graph serves every cache length: the cache is allocated per ``generate`` call, exactly as long as
the prompt plus the new tokens.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, EncoderDecoderCache


class GraphLayer(CacheLayerMixin):
    """Self-attention cache of one layer: writes ``k``/``v`` at ``offset`` and returns the whole cache."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.offset = keys, values, offset
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the tensors are the graph's inputs."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(key_states.shape[-2], device=key_states.device) + self.offset
        self.keys.index_copy_(2, positions, key_states)
        self.values.index_copy_(2, positions, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> torch.Tensor:
        return self.offset

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class FixedLayer(GraphLayer):
    """Cross-attention cache of one layer: the encoder's keys and values, computed once, read every step."""

    def update(self, key_states, value_states, *args, **kwargs):  # noqa: ANN001, ANN201
        raise RuntimeError("the cross-attention cache is read-only after the prefill")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return self.keys.shape[2]


def graph_cache(tensors: dict[str, torch.Tensor], layers: int) -> Cache:
    """A decoder's self-attention cache over ``key_<i>``/``value_<i>`` written at ``cache_position``."""
    offset = tensors["cache_position"]
    return Cache(
        layers=[GraphLayer(tensors[f"key_{i}"], tensors[f"value_{i}"], offset) for i in range(layers)]
    )


def seq2seq_cache(tensors: dict[str, torch.Tensor], layers: int) -> EncoderDecoderCache:
    """Self-attention cache as ``graph_cache``, cross-attention read from ``cross_key_<i>``/``cross_value_<i>``."""
    cross = Cache(
        layers=[
            FixedLayer(tensors[f"cross_key_{i}"], tensors[f"cross_value_{i}"], tensors["cache_position"])
            for i in range(layers)
        ]
    )
    cache = EncoderDecoderCache(graph_cache(tensors, layers), cross)
    cache.is_updated = {i: True for i in range(layers)}  # the decoder reads cross keys/values from the cache
    return cache


class PrefillLayer(CacheLayerMixin):
    """A prefill's cache layer: keeps the prompt's keys and values, which the prefill graph returns."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the layer keeps the tensors it is given."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


def prefill_cache(seq2seq: bool) -> Cache:
    """An empty cache for the prefill, whose tensors the prefill graph returns."""
    if seq2seq:
        return EncoderDecoderCache(
            Cache(layer_class_to_replicate=PrefillLayer), Cache(layer_class_to_replicate=PrefillLayer)
        )
    return Cache(layer_class_to_replicate=PrefillLayer)


def cache_outputs(cache: Cache) -> list[torch.Tensor]:
    """The keys and values a prefill wrote: ``[k_0, v_0, k_1, v_1, ...]`` (self-attention, then cross)."""
    caches = (
        [cache.self_attention_cache, cache.cross_attention_cache] if hasattr(cache, "is_updated") else [cache]
    )
    return [t for c in caches for layer in c.layers for t in (layer.keys, layer.values)]
