# Copyright 2026 The HuggingFace Team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Keeping a KV cache consistent with RoPE frequencies that depend on the sequence length.

A longrope model rotates queries and keys with its short factors while the sequence is at most
`original_max_position_embeddings` tokens long, and with its long factors beyond. The keys cached before the switch
were rotated with the short factors, and every hidden state after the first layer depends on them: once the
sequence crosses, the whole cache is stale. The same holds in reverse when a cache filled with the long factors is
cropped back below the switch point.

This module keeps, on each cache object, a `RopeCacheRecord`: which frequencies the cached keys were computed with,
and which inputs were fed through the cache, so that a stale prefix can be recomputed exactly. The record is checked
against the cache with host-side facts only (tensor identities, version counters and shapes), so ordinary decoding
steps never synchronise with the device.

The module reads top to bottom, in sections:

1. Stale-cache policies: what to do with a stale cache, per RoPE type (`set_stale_cache_policy`), and the policy a
   forward pass or `generate()` enforces.
2. RoPE regimes: `RopeRegime`, the set of frequencies a sequence length gets (`rope_frequency_regime`), and the
   regime a forward pass through a cache needs (one for the batch, or a `PerRowRopeRegime`).
3. Cache adapters: reading and emptying the caches of each release (legacy tuples of `(key, value)` tuples, the
   `key_cache` lists before 4.56, the `layers` from 4.56) and the keyword a forward pass takes its cache under.
4. The record of fed inputs: `RopeCacheRecord`, kept on each cache object, and the chunks of inputs it holds.
5. Reporting a stale cache: the warning and the error of the `"warn"` and `"raise"` policies.
6. Rerotating cached keys: the `"rerotate"` policy.
7. Preparing an update: `prepare_rope_cache_update` checks a forward pass against its cache, applies the policy
   (recomputing a stale prefix under `"recompute"`) and returns a `RopeCacheUpdate`, which records the pass after it.
8. Splitting inputs at the switch: a chunk whose returned logits lie on both sides runs as several forward passes.
9. Preparing a step of `generate()`: a stale cache is recomputed there, in eager mode, by feeding the whole sequence.
10. The decorators: `check_rope_cache` (decoder forward passes), `split_at_rope_switch` (causal LM forward passes)
    and `check_rope_cache_in_generation` (`prepare_inputs_for_generation`).
"""

import inspect
import os
import sys
import warnings
import weakref
from dataclasses import dataclass
from functools import partial, wraps

import torch

from transformers.cache_utils import DynamicCache
from transformers.utils import is_torchdynamo_compiling

from .rope_frequencies import (
    get_longrope_switch_point,
    get_rope_type,
    inverse_frequencies,
    longrope_uses_long_factors,
)


# 1. Stale-cache policies

STALE_CACHE_POLICIES = ("recompute", "rerotate", "warn", "raise", "ignore")
"""What to do when a cache computed with one set of RoPE frequencies meets a sequence that needs another:

- `"recompute"`: recompute the cached prefix with the new frequencies, in place in the caller's cache (exact);
- `"rerotate"`: rotate the cached keys from the old frequencies to the new ones, in place, without a forward pass
  (exact for the first layer only: deeper layers' keys and values were computed from hidden states that saw the old
  frequencies);
- `"warn"`: keep the stale cache and warn once per cache, naming the position and the remedy;
- `"raise"`: raise a `StaleRopeCacheError` before the stale cache is used;
- `"ignore"`: keep the stale cache silently.
"""

SEQUENCE_DEPENDENT_ROPE_TYPES = ("longrope", "dynamic")
"""RoPE types whose frequencies depend on the sequence length, and whose caches are therefore tracked."""

DEFAULT_STALE_CACHE_POLICIES = {"longrope": "recompute", "dynamic": "warn"}
"""The policy of each RoPE type unless the caller chooses another:

- `longrope` switches once, at `original_max_position_embeddings`: recomputing the prefix then costs one prefill per
  generation, and without it the outputs are far off (the model never saw a mixed cache). Exactness is cheap.
- `dynamic` (NTK) changes its frequencies at every step past `max_position_embeddings`: exactness means a prefill of
  the whole sequence at every generated token, a quadratic cost, while the error of the stale cache is small (the
  frequencies move a little each step). The cache is kept, with a warning naming the remedy.
"""

_stale_cache_policies = dict(DEFAULT_STALE_CACHE_POLICIES)


class StaleRopeCacheError(RuntimeError):
    """A KV cache computed with one set of RoPE frequencies was about to be used with another."""


class StaleRopeCacheWarning(UserWarning):
    """A KV cache computed with one set of RoPE frequencies is being used with another."""


def normalize_stale_cache_policy(policy: str | dict[str, str] | None) -> dict[str, str]:
    """
    Validates a stale-cache policy and returns it as a mapping from RoPE type to policy.

    Args:
        policy (`str`, `dict[str, str]` or `None`):
            `None` for the defaults, one of `STALE_CACHE_POLICIES` for every RoPE type, or a mapping from RoPE type
            to policy. RoPE types left out of the mapping keep their default (`DEFAULT_STALE_CACHE_POLICIES`).
    """
    if policy is None:
        policy = {}
    if isinstance(policy, str):
        policy = dict.fromkeys(SEQUENCE_DEPENDENT_ROPE_TYPES, policy)
    if not isinstance(policy, dict):
        raise ValueError(
            f"`stale_cache` must be one of {STALE_CACHE_POLICIES} or a dict from RoPE type to one of them, "
            f"got {policy!r}."
        )
    unknown_types = [rope_type for rope_type in policy if rope_type not in SEQUENCE_DEPENDENT_ROPE_TYPES]
    if unknown_types:
        raise ValueError(
            f"`stale_cache` names RoPE types {unknown_types} whose caches are not tracked; the tracked types are "
            f"{SEQUENCE_DEPENDENT_ROPE_TYPES}."
        )
    for rope_type, value in policy.items():
        if value not in STALE_CACHE_POLICIES:
            raise ValueError(
                f"Unknown stale-cache policy {value!r} for RoPE type {rope_type!r}; accepted policies are "
                f"{STALE_CACHE_POLICIES}."
            )
    return dict(DEFAULT_STALE_CACHE_POLICIES, **policy)


def set_stale_cache_policy(policy: str | dict[str, str] | None) -> None:
    """
    Sets the process-wide stale-cache policy (see `normalize_stale_cache_policy` for the accepted values; `None`: the
    defaults). RoPE types left out keep the policy they had.
    """
    _stale_cache_policies.update(normalize_stale_cache_policy(policy))


def get_stale_cache_policies() -> dict[str, str]:
    """Returns the stale-cache policy in force for each tracked RoPE type (a copy)."""
    return dict(_stale_cache_policies)


def get_stale_cache_policy(rope_type: str) -> str:
    """Returns the stale-cache policy in force for `rope_type`."""
    return _stale_cache_policies.get(rope_type, "ignore")


def enforced_stale_cache_policy(config) -> str | None:
    """
    The stale-cache policy to enforce on caches of a model with `config`, or `None` when they are not checked: its
    frequencies do not depend on the sequence length, its policy is `"ignore"`, or the call is being traced by
    `torch.compile` (the host-side bookkeeping cannot run inside a graph; the compiled step is left as it is).
    """
    rope_type = get_rope_type(config)
    policy = get_stale_cache_policy(rope_type)
    if is_torchdynamo_compiling() or rope_type not in SEQUENCE_DEPENDENT_ROPE_TYPES or policy == "ignore":
        return None
    return policy


def _generation_stale_cache_policy(config) -> str | None:
    """
    The stale-cache policy `generate()` applies. It owns its cache and knows every input, so a stale longrope cache is
    recomputed there under every policy but `"raise"`: one prefill per generation, as Phi-3's `generate()` has done
    since 4.45 by dropping its cache at the switch, so that no policy leaves `generate()` less exact than it was. The
    other policies govern the caches of hand-written loops. Dynamic NTK follows its policy in `generate()` too, since
    recomputing at every step past `max_position_embeddings` costs a prefill per generated token.
    """
    policy = enforced_stale_cache_policy(config)
    if get_rope_type(config) == "longrope" and not is_torchdynamo_compiling() and policy != "raise":
        return "recompute"
    return policy


# 2. RoPE regimes


@dataclass(frozen=True)
class RopeRegime:
    """
    A set of RoPE frequencies, shared by the sequence lengths a model rotates alike. Two forward passes in different
    regimes rotate the same position differently, so a cache filled in one regime is stale in the other. Its `str`
    names it in messages: `short`, `long`, `original` or `scaled for {sequence_length} tokens`.

    Args:
        kind (`str`):
            `"short"` or `"long"` for longrope (its two sets of factors, switched at
            `original_max_position_embeddings`), `"original"` or `"scaled"` for dynamic NTK (its base as configured,
            or scaled for a sequence longer than `max_position_embeddings`).
        sequence_length (`int`, *optional*):
            For `"scaled"` only, the sequence length the base is scaled for: each length is a regime of its own.
    """

    kind: str
    sequence_length: int | None = None

    def __str__(self) -> str:
        if self.kind == "scaled":
            return f"scaled for {self.sequence_length} tokens"
        return self.kind

    def representative_length(self, config) -> int:
        """A sequence length whose frequencies, for a model with `config`, are those of this regime."""
        if self.kind in ("short", "original"):
            return 1
        if self.kind == "long":
            return get_longrope_switch_point(config) + 1
        return self.sequence_length


@dataclass(frozen=True)
class PerRowRopeRegime:
    """
    The regimes of a longrope batch whose rows are on both sides of the switch, one per row: longrope rotates each
    row by its own length, and the rows of a left-padded batch have different lengths.
    """

    rows: tuple[RopeRegime, ...]

    def __str__(self) -> str:
        return "per-row (" + ", ".join(str(regime) for regime in self.rows) + ")"


def rope_frequency_regime(config, sequence_length: int) -> RopeRegime | None:
    """
    The set of RoPE frequencies a model with `config` uses for a sequence of `sequence_length` tokens, or `None` when
    its frequencies do not depend on the sequence length. Two forward passes with different regimes rotate the same
    position differently, so a cache filled in one regime is stale in the other.
    """
    rope_type = get_rope_type(config)
    if rope_type == "longrope":
        return RopeRegime("long" if longrope_uses_long_factors(config, sequence_length) else "short")
    if rope_type == "dynamic":
        # Dynamic NTK scales its base for the sequence length beyond `max_position_embeddings`, at every length
        if sequence_length <= config.max_position_embeddings:
            return RopeRegime("original")
        return RopeRegime("scaled", sequence_length)
    return None


def _needed_regime(
    config,
    cached_regime: RopeRegime | PerRowRopeRegime | None,
    cache_length: int,
    new_length: int,
    position_ids,
    frequencies_per_row: bool = True,
) -> RopeRegime | PerRowRopeRegime | None:
    """
    The regime of a forward pass over `new_length` tokens after `cache_length` cached ones, filled in
    `cached_regime`: one regime, or for a longrope batch whose rows are on both sides of the switch, a
    `PerRowRopeRegime`. The rotary embedding decides with `max(position_ids) + 1` (of each row, for longrope) on the
    device; positions never exceed a token's index in the sequence, so `cache_length + new_length` bounds it on the
    host. The exact values are read from the device only when the bound cannot settle the question: around the switch
    point, when explicit positions lag behind the index (left padding), until every row has crossed.

    With `frequencies_per_row=False` the rotary embedding decides for the whole batch by the index,
    `cache_length + new_length`, whatever the positions.
    """
    sequence_length_bound = cache_length + new_length
    regime_at_bound = rope_frequency_regime(config, sequence_length_bound)
    if position_ids is None or not frequencies_per_row or regime_at_bound == rope_frequency_regime(config, 1):
        return regime_at_bound
    if cached_regime == regime_at_bound:
        # Positions only grow while the cache does: the regime the cache was last filled in still holds
        return regime_at_bound
    if get_rope_type(config) != "longrope":
        # Dynamic NTK scales the whole batch by its longest row
        return rope_frequency_regime(config, int(position_ids.max()) + 1)
    # Longrope rotates each row by its own length: rows of a left-padded batch may be on both sides of the switch
    row_lengths = (position_ids.reshape(-1, position_ids.shape[-1]).amax(dim=-1) + 1).tolist()
    row_regimes = tuple(rope_frequency_regime(config, length) for length in row_lengths)
    return row_regimes[0] if len(set(row_regimes)) == 1 else PerRowRopeRegime(row_regimes)


def _row_regimes(regime: RopeRegime | PerRowRopeRegime | None, batch_size: int) -> list[RopeRegime | None]:
    """The regime of each row of a batch of `batch_size` rows."""
    return list(regime.rows) if isinstance(regime, PerRowRopeRegime) else [regime] * batch_size


def _row_changes(old_regime, new_regime, batch_size: int) -> list[bool]:
    """For each row of a batch of `batch_size` rows, whether its regime changes from `old_regime` to `new_regime`."""
    return [old != new for old, new in zip(_row_regimes(old_regime, batch_size), _row_regimes(new_regime, batch_size))]


# 3. Cache adapters: the caches of each release, read and emptied alike


def _is_legacy_cache(cache) -> bool:
    """Whether `cache` is a legacy cache: a tuple (or list) of per-layer `(key, value)` tuples."""
    return isinstance(cache, (tuple, list))


def _first_layer_key_cache(cache) -> torch.Tensor | None:
    """The key tensor of the first cached layer, or `None` while the cache is empty."""
    if _is_legacy_cache(cache):
        return cache[0][0] if len(cache) > 0 else None
    layers = getattr(cache, "layers", None)
    if layers is not None:
        # Layers from 4.54; those of 4.54 and 4.55 have no `is_initialized`, and keys `None` until the first update
        if len(layers) == 0 or not getattr(layers[0], "is_initialized", True):
            return None
        return getattr(layers[0], "keys", None)
    key_cache = getattr(cache, "key_cache", None)
    if key_cache:
        return key_cache[0]
    return None


def _first_layer_length_counter(cache) -> torch.Tensor | None:
    """The device-side length counter of the first cached layer, for caches that keep one (static caches)."""
    layers = getattr(cache, "layers", None)
    if layers:
        counter = getattr(layers[0], "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            return counter
    return None


def tokens_in_cache(cache) -> int:
    """The number of tokens `cache` holds, read from the device for caches that keep it there (static caches)."""
    cache_length = cache[0][0].shape[-2] if _is_legacy_cache(cache) else cache.get_seq_length()
    return int(cache_length) if isinstance(cache_length, torch.Tensor) else cache_length


def _cached_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The `(keys, values)` tensors a cache holds, per layer (legacy tuples, `layers` from 4.56, lists before)."""
    if _is_legacy_cache(cache):
        return [(layer[0], layer[1]) for layer in cache]
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers if getattr(layer, "is_initialized", True)]
    return list(zip(cache.key_cache, cache.value_cache))


def _holds_keys_and_values_only(cache) -> bool:
    """
    Whether `cache` holds nothing but keys and values: a hybrid model's cache also holds the states of its linear
    attention or state-space layers, which depend on the whole sequence and which `recompute_rows` does not copy (such
    a cache is recomputed whole).
    """
    state_names = ("conv_states", "recurrent_states", "ssm_states")
    holders = [cache, *getattr(cache, "layers", ())]
    return not any(hasattr(holder, name) for holder in holders for name in state_names)


def _reset_cache(cache) -> None:
    """Empties `cache` in place, keeping the object."""
    layers = getattr(cache, "layers", None)
    attention_layers = [layer for layer in layers or () if hasattr(layer, "keys")]
    if isinstance(cache, DynamicCache) and any(not hasattr(layer, "is_initialized") for layer in attention_layers):
        # 4.54 to 4.56: `reset` zeroes every layer's keys (and, 4.54 and 4.55, fails on a layer that has none yet)
        _cut_dynamic_layers(layers)
        return
    if hasattr(cache, "reset"):
        cache.reset()
    if not isinstance(cache, DynamicCache):
        return
    if layers is None:
        # Dynamic caches before 4.54 have no `reset`: cropping them to nothing empties them
        if cache.get_seq_length() > 0:
            cache.crop(0)
        return
    _cut_dynamic_layers(layers)


def _cut_dynamic_layers(layers) -> None:
    """
    Cuts each layer of a dynamic cache to no tokens. From 4.54 to 4.57 `reset` zeroes their tensors rather than
    dropping them, and the sliding-window layers of 4.57 (a Mistral config) zero their length counter too, so that
    they read as empty and refuse to crop.
    """
    for layer in layers:
        keys = getattr(layer, "keys", None)
        if keys is not None and getattr(layer, "is_initialized", True) and keys.shape[-2] > 0:
            layer.keys, layer.values = keys[..., :0, :], layer.values[..., :0, :]
            if isinstance(getattr(layer, "cumulative_length", None), int):
                layer.cumulative_length = 0


CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")
"""The keyword a forward pass takes its cache under: `cache` from 5.24, where `past_key_values` is its deprecated
alias (renamed by `deprecate_kwarg` inside the forward pass), `past_key_values` before."""


def cache_argument_name(model_inputs: dict) -> str:
    """The keyword under which `model_inputs` pass the cache (`"past_key_values"` when they pass none)."""
    return next((name for name in CACHE_ARGUMENT_NAMES if name in model_inputs), "past_key_values")


# 4. The record of fed inputs

_RECORDED_OR_POSITIONAL_INPUTS = (
    "input_ids",
    "inputs_embeds",
    "position_ids",
    "attention_mask",
    "cache_position",
    "cache",
    "past_key_values",
    "logits_to_keep",
    "num_logits_to_keep",
)
"""Forward-pass inputs the record keeps, or rebuilds for a recompute; any other tensor input is an `other_inputs`."""

_MAX_CHUNKS = 64
"""Decoding feeds one token per step: the record merges its chunks when it holds this many, to stay a short list."""


def _sequence_inputs(model_inputs: dict) -> torch.Tensor:
    """The token ids of a forward pass, or its embeddings when it is given no token ids."""
    return model_inputs["input_ids"] if model_inputs.get("input_ids") is not None else model_inputs["inputs_embeds"]


def _is_2d_attention_mask(attention_mask) -> bool:
    """Whether `attention_mask` is a 2D mask over the sequence (rather than a 4D or otherwise prepared one)."""
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2


@dataclass
class _FedChunk:
    """
    Inputs fed through a cache in one forward pass: token ids or embeddings, and their positions if given.
    `other_inputs` names the tensor inputs the record does not keep (images, audio, packed-sequence boundaries), which
    may have changed what the model made of these tokens.
    """

    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    position_ids: torch.Tensor | None
    start: int
    other_inputs: tuple[str, ...] = ()

    @classmethod
    def copy_of(cls, model_inputs: dict, start: int) -> "_FedChunk":
        """Copies the inputs of a forward pass for the record (callers may reuse their input buffers)."""
        input_ids, inputs_embeds, position_ids = (
            model_inputs.get("input_ids"),
            model_inputs.get("inputs_embeds"),
            model_inputs.get("position_ids"),
        )
        other_inputs = tuple(
            name
            for name, value in model_inputs.items()
            if isinstance(value, torch.Tensor) and name not in _RECORDED_OR_POSITIONAL_INPUTS
        )
        return cls(
            input_ids=input_ids.clone() if input_ids is not None else None,
            inputs_embeds=inputs_embeds.detach().clone() if input_ids is None else None,
            position_ids=position_ids.clone() if position_ids is not None else None,
            start=start,
            other_inputs=other_inputs,
        )

    @property
    def tokens(self) -> torch.Tensor:
        """The token ids, or the embeddings when the tokens were given as embeddings."""
        return self.input_ids if self.input_ids is not None else self.inputs_embeds

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def prefix(self, length: int) -> "_FedChunk":
        """The first `length` tokens of this chunk."""
        return _FedChunk(
            input_ids=self.input_ids[:, :length] if self.input_ids is not None else None,
            inputs_embeds=self.inputs_embeds[:, :length] if self.inputs_embeds is not None else None,
            position_ids=self.position_ids[..., :length] if self.position_ids is not None else None,
            start=self.start,
            other_inputs=self.other_inputs,
        )

    def positions(self, batch_size: int) -> torch.Tensor:
        """The positions of these tokens in each of `batch_size` rows: the explicit ones, or their indices."""
        if self.position_ids is not None:
            return self.position_ids.expand(batch_size, -1)
        positions = torch.arange(self.start, self.start + self.length, device=self.tokens.device)
        return positions.unsqueeze(0).expand(batch_size, -1)


def _merge_chunks(chunks: list[_FedChunk]) -> list[_FedChunk]:
    """
    Concatenates runs of neighbouring chunks of the same kind (token ids or embeddings, with or without positions).
    """

    def kind(chunk):
        positions_shape = chunk.position_ids.shape[:-1] if chunk.position_ids is not None else None
        return chunk.input_ids is not None, positions_shape

    merged = [chunks[0]]
    for chunk in chunks[1:]:
        previous = merged[-1]
        if kind(chunk) != kind(previous):
            merged.append(chunk)
            continue
        merged[-1] = _FedChunk(
            input_ids=torch.cat([previous.input_ids, chunk.input_ids], dim=1) if chunk.input_ids is not None else None,
            inputs_embeds=(
                torch.cat([previous.inputs_embeds, chunk.inputs_embeds], dim=1)
                if chunk.inputs_embeds is not None
                else None
            ),
            position_ids=(
                torch.cat([previous.position_ids, chunk.position_ids], dim=-1)
                if chunk.position_ids is not None
                else None
            ),
            start=previous.start,
        )
    return merged


@torch.no_grad()
def _fold_chunks(chunks: list[_FedChunk], embedding_layer: torch.nn.Module) -> _FedChunk:
    """One chunk of embeddings (and positions, if any chunk has them) standing for all of `chunks`."""
    batch_size = max(chunk.tokens.shape[0] for chunk in chunks)
    inputs_embeds = torch.cat(
        [
            (chunk.inputs_embeds if chunk.inputs_embeds is not None else embedding_layer(chunk.input_ids)).expand(
                batch_size, -1, -1
            )
            for chunk in chunks
        ],
        dim=1,
    )
    position_ids = None
    if any(chunk.position_ids is not None for chunk in chunks):
        position_ids = torch.cat([chunk.positions(batch_size) for chunk in chunks], dim=-1)
    return _FedChunk(input_ids=None, inputs_embeds=inputs_embeds, position_ids=position_ids, start=chunks[0].start)


def _tensor_state(tensor: torch.Tensor | None):
    """Host-side identity of a tensor's contents: a weak reference to the object, its in-place version counter, and
    its shape, strides and base (to recognise a crop of it, see `_is_view_of`)."""
    if tensor is None:
        return None
    base = tensor._base if tensor._base is not None else tensor
    return weakref.ref(tensor), tensor._version, tuple(tensor.shape), tensor.stride(), weakref.ref(base)


def _same_tensor_state(state, tensor: torch.Tensor | None) -> bool:
    """Whether `tensor` is the tensor whose `_tensor_state` is `state`, unchanged in place since."""
    if state is None or tensor is None:
        return state is None and tensor is None
    reference, version = state[:2]
    return reference() is tensor and tensor._version == version


def _is_view_of(state, tensor: torch.Tensor | None) -> bool:
    """
    Whether `tensor` (a first layer's keys) is a view of the tensor whose `_tensor_state` is `state`, or of its base,
    with the same batch, heads and head size, unchanged in place since: what a crop leaves (`DynamicCache.crop`,
    a sliding-window layer's too), never a reorder, a narrowed batch, a reset or a forward pass, which make other
    tensors or rows. Told by identity (a view holds its base), never by memory addresses, which a freed tensor may
    pass on.
    """
    if state is None or tensor is None or tensor._base is None:
        return False
    _, version, shape, stride, base_reference = state
    # The remembered tensor may be gone (a crop replaces a view by a view), but not its base: the new view holds it
    if tensor._base is not base_reference():
        return False
    same_rows = tuple(tensor.shape[:-2]) == shape[:-2] and tensor.shape[-1] == shape[-1]
    return same_rows and tensor.stride() == stride and tensor._version == version


class RopeCacheRecord:
    """
    What the model knows of a cache it has filled: its length, the RoPE regime its keys were rotated in, and the
    inputs fed through it. It is stored on the cache object itself, so it follows the cache wherever the caller
    takes it.

    The record only trusts its inputs while the cache is exactly as the model left it. Anything done to the cache
    outside the model (a crop, a reorder, a reset, a forward pass without the record) changes the identity or the
    in-place version of its first layer's tensors; the record then forgets its inputs. The regime survives crops and
    reorders, since they move or drop keys without re-rotating them.
    """

    def __init__(self):
        self.length = 0
        self.regime: RopeRegime | PerRowRopeRegime | None = None
        self.chunks: list[_FedChunk] | None = []
        # Why the inputs are unknown, when they are
        self.unknown_inputs_reason = ""
        self.warned = False
        # Set by `generate()` when it feeds the whole sequence again: only the logits of this many tokens at the end
        # are its own (releases before 4.45 have no `logits_to_keep` to say so)
        self.refed_new_length: int | None = None
        self._key_state = None
        self._counter_state = None

    @staticmethod
    def _holder(cache):
        # A legacy cache cannot hold attributes; its first key tensor, which is carried over from one tuple to the
        # next, holds the record instead
        return _first_layer_key_cache(cache) if _is_legacy_cache(cache) else cache

    @classmethod
    def of(cls, cache) -> "RopeCacheRecord":
        """Returns the record kept on `cache`, creating an empty one if it has none."""
        holder = cls._holder(cache)
        record = getattr(holder, "_rope_cache_record", None)
        if record is None:
            record = cls()
            if holder is not None:
                holder._rope_cache_record = record
        return record

    def move_to(self, cache) -> None:
        """Keeps this record on `cache` from now on (a legacy cache returned in place of the one it was kept on)."""
        self._holder(cache)._rope_cache_record = self

    @property
    def inputs_are_known(self) -> bool:
        return self.chunks is not None

    def observe(self, cache, config) -> int:
        """
        Reconciles the record with `cache` and returns the number of tokens the cache holds. Reads the device only
        when the cache keeps its length on the device and was changed outside the model since the model last saw it.
        """
        keys = _first_layer_key_cache(cache)
        counter = _first_layer_length_counter(cache)
        untouched = _same_tensor_state(self._key_state, keys) and _same_tensor_state(self._counter_state, counter)
        if untouched:
            return self.length

        if counter is None and self.inputs_are_known and _is_view_of(self._key_state, keys):
            # Cropped back (a rollback, assisted decoding): it holds the first tokens fed, still in the regime they
            # were rotated in
            cropped_length = tokens_in_cache(cache)
            if cropped_length <= self.length:
                self.truncate(cropped_length)
                self.remember(cache)
                return cropped_length
        if counter is not None and _same_tensor_state(self._counter_state, counter):
            cache_length = self.length
        else:
            # One synchronisation, only after the cache was changed outside the model
            cache_length = tokens_in_cache(cache)

        if cache_length == 0:
            self.restart(regime=None, chunks=[])
        else:
            if self.regime is None:
                # A cache filled without a record: assume one forward pass over its length, as upstream fills it
                self.regime = rope_frequency_regime(config, cache_length)
            self.forget_inputs("the cache was cropped, reordered or filled outside the model")
            self.length = cache_length
        self.remember(cache)
        return cache_length

    def truncate(self, length: int):
        """Records that the cache now holds only the first `length` tokens it held (it was cropped)."""
        kept, remaining = [], length
        for chunk in self.chunks:
            if remaining <= 0:
                break
            kept.append(chunk if chunk.length <= remaining else chunk.prefix(remaining))
            remaining -= kept[-1].length
        self.chunks = kept
        self.length = length
        if length == 0:
            self.regime = None

    def forget_inputs(self, reason: str):
        """Drops the recorded inputs, which no longer say what the cache holds, noting `reason` for messages."""
        self.chunks = None
        self.unknown_inputs_reason = reason

    def restart(self, regime: RopeRegime | PerRowRopeRegime | None, chunks: list[_FedChunk]):
        """Records that the cache now holds `chunks` alone, in `regime`."""
        self.regime = regime
        self.chunks = chunks
        self.length = sum(chunk.length for chunk in chunks)
        self._forget_inputs_of_other_modalities(chunks)

    def append(self, chunk: _FedChunk, regime: RopeRegime | PerRowRopeRegime | None, embedding_layer: torch.nn.Module):
        """Records that `chunk` was fed through the cache after what it held, and that the cache is now in `regime`."""
        if self.chunks is not None:
            self.chunks.append(chunk)
            if len(self.chunks) >= _MAX_CHUNKS:
                self.chunks = _merge_chunks(self.chunks)
            if len(self.chunks) >= _MAX_CHUNKS // 2:
                # Token ids and embeddings alternate too often to merge: everything becomes one chunk of embeddings
                self.chunks = [_fold_chunks(self.chunks, embedding_layer)]
        self.length += chunk.length
        self.regime = regime
        self._forget_inputs_of_other_modalities([chunk])

    def _forget_inputs_of_other_modalities(self, new_chunks: list[_FedChunk]):
        # Token ids alone do not give back what a model made of them with images or audio
        other_inputs = sorted({name for chunk in new_chunks for name in chunk.other_inputs})
        if other_inputs:
            names = ", ".join(f"`{name}`" for name in other_inputs)
            self.forget_inputs(f"tokens were fed with {names}, which the cache record does not keep")

    def remember(self, cache):
        """Notes the state in which the model leaves `cache`, to recognise it next time."""
        self._key_state = _tensor_state(_first_layer_key_cache(cache))
        self._counter_state = _tensor_state(_first_layer_length_counter(cache))

    def fed_inputs(self, embedding_layer: torch.nn.Module):
        """
        Returns `(input_ids, inputs_embeds, position_ids)` for everything fed through the cache, exactly one of the
        first two set. Token ids are embedded when some inputs were given as embeddings. `position_ids` is `None`
        when no forward pass was given explicit positions.
        """
        chunks = self.chunks
        if all(chunk.input_ids is not None for chunk in chunks):
            input_ids, inputs_embeds = torch.cat([chunk.input_ids for chunk in chunks], dim=1), None
        else:
            input_ids = None
            inputs_embeds = torch.cat(
                [
                    chunk.inputs_embeds if chunk.inputs_embeds is not None else embedding_layer(chunk.input_ids)
                    for chunk in chunks
                ],
                dim=1,
            )
        position_ids = None
        if any(chunk.position_ids is not None for chunk in chunks):
            batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            position_ids = torch.cat([chunk.positions(batch_size) for chunk in chunks], dim=-1)
        return input_ids, inputs_embeds, position_ids


# 5. Reporting a stale cache: the `"warn"` and `"raise"` policies


def _library_directories() -> tuple[str, ...]:
    """The folders of the code between a caller and this module: torch's, transformers', and this package's."""
    import transformers

    return tuple(
        os.path.dirname(os.path.abspath(module.__file__)) + os.sep
        for module in (torch, transformers, sys.modules[__name__])
    )


def caller_stacklevel() -> int:
    """
    The `stacklevel` that makes a warning point at the caller's own line (their loop, their `generate()` call), past
    every frame of torch, transformers and this package, however deep the decorators and module calls nest.
    """
    library_directories = _library_directories()
    frame, stacklevel = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(library_directories):
        frame, stacklevel = frame.f_back, stacklevel + 1
    return stacklevel


def _warn_stale_cache(record: RopeCacheRecord, cache_length: int, new_length: int, regime, rope_type: str):
    """Warns, once per cache, that a forward pass in `regime` extends a cache filled in `record.regime`."""
    if record.warned:
        return
    record.warned = True
    warnings.warn(
        f"The KV cache holds {cache_length} tokens computed with the {record.regime} {rope_type} RoPE "
        f"frequencies, but the sequence is now {cache_length + new_length} tokens long and needs the "
        f"{regime} ones: the cached "
        "keys and values are stale and the outputs will differ from a forward pass without cache. To recompute the "
        'cache exactly, use `stale_cache="recompute"`.',
        StaleRopeCacheWarning,
        stacklevel=caller_stacklevel(),
    )


def _stale_cache_error(record: RopeCacheRecord, cache_length: int, new_length: int, regime, reason: str):
    """The error raised instead of extending a cache filled in `record.regime` with a forward pass in `regime`."""
    return StaleRopeCacheError(
        f"The KV cache holds {cache_length} tokens computed with the {record.regime} RoPE frequencies, but "
        f"the sequence is now {cache_length + new_length} tokens long and needs the {regime} ones. {reason}"
    )


# 6. Rerotating cached keys: the `"rerotate"` policy


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rerotate_cached_keys(
    config, past_key_values, record: RopeCacheRecord, cache_length: int, regime: RopeRegime | PerRowRopeRegime
) -> None:
    """
    Rotates the keys cached in `past_key_values` from the frequencies of `record.regime` to those of `regime`, in
    place. A key rotated by angle `p * f_old` becomes the key rotated by `p * f_new` by a further rotation of
    `p * (f_new - f_old)` (rotations of a plane commute; the attention scaling, equal for both sets, is untouched).
    Values are not rotated. Exact for the first layer; the deeper layers' keys and values were computed from hidden
    states that attended with the old frequencies, which no rotation undoes.
    """
    keys_per_layer = [keys for keys, _ in _cached_layers(past_key_values)]
    if not keys_per_layer:
        return
    device, batch_size = keys_per_layer[0].device, keys_per_layer[0].shape[0]

    def row_inverse_frequencies(regime) -> torch.Tensor:
        lengths = [row_regime.representative_length(config) for row_regime in _row_regimes(regime, batch_size)]
        return torch.stack([inverse_frequencies(config, length, device) for length in lengths])

    # One rotation per row: the rows of a batch may be on either side of the switch
    frequency_change = row_inverse_frequencies(regime) - row_inverse_frequencies(record.regime)
    if record.inputs_are_known:
        positions = torch.cat([chunk.positions(batch_size) for chunk in record.chunks], dim=-1)
    else:
        positions = torch.arange(cache_length, device=device)[None].expand(batch_size, -1)
    angles = positions[:, None, :, None].float() * frequency_change[:, None, None, :]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    rotary_dim = cos.shape[-1]
    for keys in keys_per_layer:
        rotated = keys[..., :cache_length, :rotary_dim].float()
        rotated = rotated * cos + _rotate_half(rotated) * sin
        keys[..., :cache_length, :rotary_dim] = rotated.to(keys.dtype)
    record.remember(past_key_values)


# 7. Preparing an update: one forward pass through a cache, checked against its regime


class RopeCacheUpdate:
    """
    One forward pass through a cache, seen from the RoPE frequencies. Made before the forward pass by
    `prepare_rope_cache_update`, with the named constructor of its mode:

    - `untracked`: the model's frequencies do not depend on the sequence length (or the call is traced); nothing is
      recorded;
    - `new_cache`: no cache is passed; if the model creates one, its record starts with this forward pass;
    - `extension`: the forward pass extends the cache as it is, and the record appends its inputs;
    - `row_recompute`: some rows of the batch need other frequencies; `recompute_rows` recomputes their cached prefix
      in place before the forward pass of the caller's inputs;
    - `prefix_recompute`: the cache was emptied in place, and `model_inputs` feed everything it held before the
      caller's tokens, refilling it with the right frequencies.

    After the forward pass, `commit` records it on the cache and `caller_outputs` drops the outputs of a recomputed
    prefix. `model_inputs` are the arguments of the forward pass.
    """

    def __init__(
        self,
        mode: str,
        model_inputs: dict,
        *,
        record: RopeCacheRecord | None = None,
        chunks: list[_FedChunk] | None = None,
        regime: RopeRegime | PerRowRopeRegime | None = None,
        prefix_length: int = 0,
        row_recompute: tuple | None = None,
        config=None,
        frequencies_per_row: bool = True,
    ):
        # Use the named constructors below: each sets the arguments of its mode
        self.mode = mode
        self.model_inputs = model_inputs
        self._record = record
        self._chunks = chunks
        self._regime = regime
        # `prefix_recompute`: the number of recomputed tokens in front of the caller's
        self._prefix_length = prefix_length
        # `row_recompute`: `(rows, their inputs over the whole sequence, cache length)`
        self._row_recompute = row_recompute
        # `new_cache`: what `commit` needs to find the regime of the first forward pass
        self._config = config
        self._frequencies_per_row = frequencies_per_row

    @classmethod
    def untracked(cls, model_inputs: dict) -> "RopeCacheUpdate":
        """A forward pass whose cache is not checked: `commit` and `caller_outputs` leave everything as it is."""
        return cls("untracked", model_inputs)

    @classmethod
    def new_cache(cls, model_inputs: dict, config, frequencies_per_row: bool) -> "RopeCacheUpdate":
        """A forward pass given no cache: if the model creates one, `commit` starts its record with this pass."""
        return cls("new_cache", model_inputs, config=config, frequencies_per_row=frequencies_per_row)

    @classmethod
    def extension(cls, model_inputs: dict, record: RopeCacheRecord, chunk: _FedChunk, regime) -> "RopeCacheUpdate":
        """A forward pass that extends the cache of `record` as it is, in `regime`."""
        return cls("extension", model_inputs, record=record, chunks=[chunk], regime=regime)

    @classmethod
    def row_recompute(
        cls,
        model_inputs: dict,
        record: RopeCacheRecord,
        chunk: _FedChunk,
        regime,
        rows: torch.Tensor,
        row_inputs: dict,
        cache_length: int,
    ) -> "RopeCacheUpdate":
        """
        A forward pass of the caller's inputs, in `regime`, once the first `cache_length` cached tokens of `rows` have
        been recomputed by a forward pass of `row_inputs` (see `recompute_rows`).
        """
        return cls(
            "row_recompute",
            model_inputs,
            record=record,
            chunks=[chunk],
            regime=regime,
            row_recompute=(rows, row_inputs, cache_length),
        )

    @classmethod
    def prefix_recompute(
        cls, model_inputs: dict, record: RopeCacheRecord, chunks: list[_FedChunk], regime, prefix_length: int
    ) -> "RopeCacheUpdate":
        """
        A forward pass, in `regime`, of `chunks` (everything the emptied cache held, then the caller's inputs) through
        the emptied cache; the first `prefix_length` tokens of its outputs are not the caller's.
        """
        return cls(
            "prefix_recompute", model_inputs, record=record, chunks=chunks, regime=regime, prefix_length=prefix_length
        )

    def recompute_rows(self, decoder, model_forward, past_key_values) -> None:
        """
        Recomputes, in place, the cached keys and values of the rows whose frequencies changed, and only those: the
        rows run alone through `model_forward` over their whole sequence (so that each gets the frequencies of its
        own length) into a new cache, whose prefix is copied into theirs. The forward pass of the caller's tokens
        then runs as usual, for every row. Does nothing in the other modes.
        """
        if self.mode != "row_recompute":
            return
        rows, row_inputs, cache_length = self._row_recompute
        recomputed = model_forward(decoder, **row_inputs).past_key_values
        for (keys, values), (new_keys, new_values) in zip(_cached_layers(past_key_values), _cached_layers(recomputed)):
            keys[rows, :, :cache_length] = new_keys[:, :, :cache_length].to(keys.dtype)
            values[rows, :, :cache_length] = new_values[:, :, :cache_length].to(values.dtype)

    def commit(self, past_key_values, embedding_layer: torch.nn.Module) -> None:
        """
        Records the forward pass on `past_key_values`, the cache the model returned (if any). `embedding_layer` embeds
        recorded token ids when the record folds its inputs into embeddings.
        """
        if past_key_values is None or self.mode == "untracked":
            return
        chunks, regime = self._chunks, self._regime
        if self.mode == "new_cache":
            # The model created this cache itself: its record starts with this forward pass
            chunk = _FedChunk.copy_of(self.model_inputs, start=0)
            chunks = [chunk]
            regime = _needed_regime(self._config, None, 0, chunk.length, chunk.position_ids, self._frequencies_per_row)
        if _is_legacy_cache(past_key_values) and self._record is not None:
            # A legacy cache comes back as a new tuple: the record moves on to it
            self._record.move_to(past_key_values)
        record = RopeCacheRecord.of(past_key_values)
        record.refed_new_length = None
        if record is not self._record or self.mode in ("new_cache", "prefix_recompute"):
            record.restart(regime, list(chunks))
        else:
            for chunk in chunks:
                record.append(chunk, regime, embedding_layer)
        record.remember(past_key_values)

    def abandon(self, past_key_values) -> None:
        """
        After a recompute that raised half-way (any exception, `KeyboardInterrupt` included): empties the cache in
        place and records that it still has to hold everything fed before the caller's tokens, so that the next
        forward pass (the same step again, say) recomputes it exactly. Nothing to do in the other modes, or for a
        legacy cache, which the recompute did not touch.
        """
        if self.mode not in ("prefix_recompute", "row_recompute") or _is_legacy_cache(past_key_values):
            return
        before_caller = self._chunks[:-1] if self.mode == "prefix_recompute" else list(self._record.chunks)
        _reset_cache(past_key_values)
        self._record.restart(regime=None, chunks=before_caller)
        self._record.remember(past_key_values)

    def caller_outputs(self, outputs):
        """Returns `outputs` restricted to the caller's tokens (a recomputed prefix is not theirs)."""
        if self.mode != "prefix_recompute":
            return outputs
        prefix_length = self._prefix_length
        outputs.last_hidden_state = outputs.last_hidden_state[:, prefix_length:]
        if getattr(outputs, "hidden_states", None) is not None:
            outputs.hidden_states = tuple(hidden_state[:, prefix_length:] for hidden_state in outputs.hidden_states)
        if getattr(outputs, "attentions", None) is not None:
            outputs.attentions = tuple(attention[..., prefix_length:, :] for attention in outputs.attentions)
        if getattr(outputs, "router_logits", None) is not None:
            # Mixture-of-experts decoders return them flattened over batch and sequence
            batch_size, sequence_length = _sequence_inputs(self.model_inputs).shape[:2]
            outputs.router_logits = tuple(
                logits.reshape(batch_size, sequence_length, -1)[:, prefix_length:].reshape(-1, logits.shape[-1])
                for logits in outputs.router_logits
            )
        return outputs


def prepare_rope_cache_update(
    config, past_key_values, model_inputs: dict, embedding_layer, frequencies_per_row: bool = True
) -> RopeCacheUpdate:
    """
    Checks a forward pass of a decoder model against the RoPE regime its cache was filled in, and applies the
    stale-cache policy. With `"recompute"`, a stale cache is reset in place and the inputs are extended with everything
    fed through it before, so that one forward pass refills the same cache object with the right frequencies.

    Args:
        config: the model's config.
        past_key_values: the cache the forward pass extends (or `None`).
        model_inputs (`dict`): the keyword arguments of the forward pass. `input_ids`, `inputs_embeds`,
            `position_ids`, `attention_mask` and `cache_position` are read, and replaced when the prefix is recomputed.
        embedding_layer (`nn.Module`): the model's input embeddings, to embed recorded token ids when some inputs were
            given as embeddings.
        frequencies_per_row (`bool`, *optional*, defaults to `True`): whether the model's rotary embedding gives each
            row of a batch the frequencies of its own length (from its positions), or `False` when it chooses them
            for the whole batch by the cache index.

    Returns:
        A `RopeCacheUpdate` whose `model_inputs` are the arguments for the forward pass. Its `commit` must be called
        with the returned cache afterwards, and its `caller_outputs` gives the outputs of the caller's tokens.
    """
    policy = enforced_stale_cache_policy(config)
    if policy is None:
        return RopeCacheUpdate.untracked(model_inputs)
    if past_key_values is None:
        # Nothing to check; `commit` records the pass only if the model creates a cache
        return RopeCacheUpdate.new_cache(model_inputs, config, frequencies_per_row)

    new_length = _sequence_inputs(model_inputs).shape[1]
    record = RopeCacheRecord.of(past_key_values)
    cache_length = record.observe(past_key_values, config)
    chunk = _FedChunk.copy_of(model_inputs, start=cache_length)
    position_ids = model_inputs.get("position_ids")
    regime = _needed_regime(config, record.regime, cache_length, new_length, position_ids, frequencies_per_row)
    if cache_length == 0 or record.regime == regime:
        return RopeCacheUpdate.extension(model_inputs, record, chunk, regime)

    if policy == "raise":
        reason = 'Use `stale_cache="recompute"` to recompute it exactly.'
        raise _stale_cache_error(record, cache_length, new_length, regime, reason)
    if policy == "warn":
        _warn_stale_cache(record, cache_length, new_length, regime, get_rope_type(config))
        return RopeCacheUpdate.extension(model_inputs, record, chunk, regime)
    if policy == "rerotate":
        rerotate_cached_keys(config, past_key_values, record, cache_length, regime)
        return RopeCacheUpdate.extension(model_inputs, record, chunk, regime)
    return _recompute_stale_cache(past_key_values, model_inputs, embedding_layer, record, cache_length, chunk, regime)


def _recompute_stale_cache(
    past_key_values,
    model_inputs: dict,
    embedding_layer,
    record: RopeCacheRecord,
    cache_length: int,
    chunk: _FedChunk,
    regime,
) -> RopeCacheUpdate:
    """
    The `"recompute"` policy, for a forward pass of `chunk` (the caller's `model_inputs`) in `regime` through a cache
    of `cache_length` tokens filled in `record.regime`. When only some rows of the batch change regime, those rows
    are recomputed alone (a `row_recompute` update); otherwise the cache is emptied in place and the forward pass
    feeds the whole sequence (a `prefix_recompute` update).
    """
    _check_recomputable(record, cache_length, chunk.length, regime, model_inputs.get("attention_mask"))
    whole_inputs = _with_recorded_prefix(model_inputs, record, chunk, embedding_layer)
    new_inputs = _sequence_inputs(model_inputs)
    batch_size = new_inputs.shape[0]
    changed_rows = [row for row, changed in enumerate(_row_changes(record.regime, regime, batch_size)) if changed]
    if len(changed_rows) < batch_size and not chunk.other_inputs and _holds_keys_and_values_only(past_key_values):
        # Rows on both sides of the switch: only the rows that changed are recomputed (by their text inputs alone,
        # so not when other inputs come with these tokens; all rows are recomputed with them then)
        rows = torch.tensor(changed_rows, device=new_inputs.device)
        row_inputs = _row_recompute_inputs(whole_inputs, rows)
        return RopeCacheUpdate.row_recompute(model_inputs, record, chunk, regime, rows, row_inputs, cache_length)

    if _is_legacy_cache(past_key_values):
        # A legacy cache cannot be emptied in place; the model starts a new one, returned to the caller as usual
        whole_inputs[cache_argument_name(whole_inputs)] = None
    else:
        _reset_cache(past_key_values)
    return RopeCacheUpdate.prefix_recompute(whole_inputs, record, [*record.chunks, chunk], regime, cache_length)


def _check_recomputable(record: RopeCacheRecord, cache_length: int, new_length: int, regime, attention_mask) -> None:
    """Raises a `StaleRopeCacheError` when the stale cache of `record` cannot be recomputed from what is known."""
    if not record.inputs_are_known:
        raise _stale_cache_error(
            record,
            cache_length,
            new_length,
            regime,
            f"It cannot be recomputed: {record.unknown_inputs_reason}, so the inputs it holds are unknown. Run the "
            "whole sequence again (with all its inputs) without the cache, or through an empty one; `generate()` "
            "does this itself.",
        )
    if attention_mask is not None and not _is_2d_attention_mask(attention_mask):
        raise _stale_cache_error(
            record,
            cache_length,
            new_length,
            regime,
            "Recomputing it needs a 2D attention mask over the whole sequence (or none), got a 4D or prepared mask.",
        )


def _with_recorded_prefix(model_inputs: dict, record: RopeCacheRecord, chunk: _FedChunk, embedding_layer) -> dict:
    """
    The inputs of one forward pass over the whole sequence: everything fed through the cache of `record`, then the
    caller's `model_inputs` (recorded as `chunk`). Token ids when every part has them, embeddings otherwise; positions
    when any part has explicit ones; `cache_position` from 0.
    """
    input_ids, inputs_embeds = model_inputs.get("input_ids"), model_inputs.get("inputs_embeds")
    whole_inputs = dict(model_inputs)
    prefix_ids, prefix_embeds, prefix_positions = record.fed_inputs(embedding_layer)
    if prefix_ids is not None and input_ids is not None:
        whole_inputs["input_ids"] = torch.cat([prefix_ids, input_ids], dim=1)
    else:
        prefix_embeds = prefix_embeds if prefix_embeds is not None else embedding_layer(prefix_ids)
        new_embeds = inputs_embeds if inputs_embeds is not None else embedding_layer(input_ids)
        whole_inputs["input_ids"] = None
        whole_inputs["inputs_embeds"] = torch.cat([prefix_embeds, new_embeds], dim=1)
    if prefix_positions is not None or model_inputs.get("position_ids") is not None:
        batch_size = _sequence_inputs(model_inputs).shape[0]
        prefix_chunk = _FedChunk(prefix_ids, prefix_embeds, prefix_positions, start=0)
        whole_inputs["position_ids"] = torch.cat(
            [prefix_chunk.positions(batch_size), chunk.positions(batch_size)], dim=-1
        )
    if whole_inputs.get("cache_position") is not None:
        whole_length = chunk.start + chunk.length
        whole_inputs["cache_position"] = torch.arange(whole_length, device=whole_inputs["cache_position"].device)
    return whole_inputs


def _row_recompute_inputs(whole_inputs: dict, rows: torch.Tensor) -> dict:
    """The inputs of a forward pass of `rows` alone over the whole sequence, into a new cache."""
    row_inputs = {cache_argument_name(whole_inputs): None, "use_cache": True}
    for name in ("input_ids", "inputs_embeds", "position_ids", "attention_mask"):
        row_inputs[name] = whole_inputs[name][rows] if whole_inputs.get(name) is not None else None
    if whole_inputs.get("cache_position") is not None:
        row_inputs["cache_position"] = whole_inputs["cache_position"]
    return row_inputs


# 8. Splitting inputs at the switch


def split_inputs_at_rope_switch(
    config, model_inputs: dict, logits_to_keep_name: str | None, frequencies_per_row: bool = True
) -> list[dict]:
    """
    Splits a multi-token forward pass of a causal LM through a cache when the tokens whose logits it returns lie on
    both sides of a RoPE switch (a verification chunk in assisted decoding, a chunk of a hand-written loop). Decoding
    token by token, each of those tokens would be processed with the frequencies of the sequence ending at it; one
    forward pass over the whole chunk would give them all the frequencies of the longest. The chunk is therefore run
    as consecutive forward passes through the same cache, one per regime among the kept tokens: for longrope the
    tokens before the switch, then the others (which recompute the cache, by the policy); for dynamic NTK past
    `max_position_embeddings`, one per token. Only the logits the caller keeps count: a prefill that returns the last
    logits is one pass.

    Args:
        config: the model's config.
        model_inputs (`dict`): the keyword arguments of the forward pass.
        logits_to_keep_name (`str`, *optional*): the name of the forward pass's `logits_to_keep` argument
            (`num_logits_to_keep` in older releases), or `None` if it has none (it then returns every logit).
        frequencies_per_row (`bool`, *optional*, defaults to `True`): as in `prepare_rope_cache_update`.

    Returns:
        A list of dicts of forward-pass keyword arguments (one when nothing is split) whose logits, concatenated, are
        the logits the caller asked for. Each part's `logits_to_keep` says how many of its logits are kept.
    """
    past_key_values = model_inputs.get(cache_argument_name(model_inputs))
    logits_to_keep = model_inputs.get(logits_to_keep_name, 0) if logits_to_keep_name is not None else 0
    if not _may_split(config, model_inputs, past_key_values, logits_to_keep):
        return [model_inputs]
    new_length = _sequence_inputs(model_inputs).shape[1]
    kept_length = new_length if logits_to_keep == 0 else min(logits_to_keep, new_length)
    record = RopeCacheRecord.of(past_key_values)
    if record.refed_new_length is not None:
        kept_length, record.refed_new_length = min(kept_length, record.refed_new_length), None
    if kept_length < 2:
        return [model_inputs]
    cache_length = record.observe(past_key_values, config)
    first_kept = new_length - kept_length
    boundaries = _regime_boundaries(config, model_inputs, cache_length, new_length, first_kept, frequencies_per_row)
    if not boundaries:
        return [model_inputs]
    starts, ends = [0, *boundaries], [*boundaries, new_length]
    return [
        _input_part(model_inputs, cache_length, start, end, end - max(start, first_kept), logits_to_keep_name)
        for start, end in zip(starts, ends)
    ]


def _may_split(config, model_inputs: dict, past_key_values, logits_to_keep) -> bool:
    """
    Whether a forward pass may be split at all: it extends a cache, computes no loss over the whole chunk (`labels`),
    runs under a policy that acts on a stale cache (not `"warn"`, nor untracked), keeps a number of logits (not a
    tensor of indices), and has no prepared attention mask, which cannot be cut.
    """
    attention_mask = model_inputs.get("attention_mask")
    return not (
        past_key_values is None
        or model_inputs.get("labels") is not None
        or enforced_stale_cache_policy(config) in (None, "warn")
        or not isinstance(logits_to_keep, int)
        or (attention_mask is not None and not _is_2d_attention_mask(attention_mask))
    )


def _regime_boundaries(
    config, model_inputs: dict, cache_length: int, new_length: int, first_kept: int, frequencies_per_row: bool
) -> list[int]:
    """
    The indices, among the `new_length` tokens of a forward pass after `cache_length` cached ones, where a token
    whose logits are kept (from `first_kept` on) needs another regime than the token before it.
    """
    # Host-side bounds on the sequence lengths of the first kept token and of the last token
    first_kept_regime = rope_frequency_regime(config, cache_length + first_kept + 1)
    if first_kept_regime == rope_frequency_regime(config, cache_length + new_length):
        return []
    position_ids = model_inputs.get("position_ids")
    if position_ids is None or not frequencies_per_row:
        sequence_lengths = range(cache_length + 1, cache_length + new_length + 1)
    else:
        # Read once, at the switch: explicit positions may lag behind the index (left padding)
        sequence_lengths = (position_ids.reshape(-1, new_length).amax(dim=0) + 1).tolist()
    regimes = [rope_frequency_regime(config, length) for length in sequence_lengths]
    # A pass rotates with the regime of its longest sequence: tokens whose logits are dropped go with the next part
    return [index for index in range(first_kept + 1, new_length) if regimes[index] != regimes[index - 1]]


def _input_part(
    model_inputs: dict, cache_length: int, start: int, end: int, kept: int, logits_to_keep_name: str | None
) -> dict:
    """The inputs of the forward pass over new tokens `start` to `end`, which keeps the logits of the last `kept`."""
    inputs = dict(model_inputs)
    for name in ("input_ids", "position_ids", "cache_position"):
        if inputs.get(name) is not None:
            inputs[name] = inputs[name][..., start:end]
    if inputs.get("inputs_embeds") is not None:
        inputs["inputs_embeds"] = inputs["inputs_embeds"][:, start:end]
    attention_mask = model_inputs.get("attention_mask")
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask[:, : cache_length + end]
    if logits_to_keep_name is not None:
        inputs[logits_to_keep_name] = kept
    return inputs


def _concatenate_outputs(part_outputs: list):
    """Joins the outputs of consecutive forward passes over parts of one chunk, along the sequence."""
    outputs = part_outputs[-1]
    for name in ("last_hidden_state", "logits"):
        if getattr(outputs, name, None) is not None:
            setattr(outputs, name, torch.cat([getattr(output, name) for output in part_outputs], dim=1))
    if getattr(outputs, "hidden_states", None) is not None:
        outputs.hidden_states = tuple(
            torch.cat(layer_states, dim=1) for layer_states in zip(*(output.hidden_states for output in part_outputs))
        )
    if getattr(outputs, "attentions", None) is not None:
        # The earlier part's queries could not see the later part's keys: their weights there are zero
        key_length = outputs.attentions[0].shape[-1]
        outputs.attentions = tuple(
            torch.cat(
                [
                    torch.nn.functional.pad(attention, (0, key_length - attention.shape[-1]))
                    for attention in layer_attentions
                ],
                dim=-2,
            )
            for layer_attentions in zip(*(output.attentions for output in part_outputs))
        )
    return outputs


# 9. Preparing a step of `generate()`


def prepare_rope_cache_for_generation(
    config, past_key_values, input_ids, attention_mask, position_ids, frequencies_per_row: bool = True
) -> str | None:
    """
    Called by `generate()` before each forward pass, with the whole sequence so far, in eager mode (also when the
    forward pass itself is compiled).

    When the cache was cropped or reordered (assisted decoding, beam search), the record no longer knows what the
    cache holds, but `generate()` does: the first `cache_length` tokens of `input_ids`. The record learns them again.

    When the coming forward pass needs other RoPE frequencies than the cache holds and the policy `generate()` applies
    is `"recompute"` (see `_generation_stale_cache_policy`: for longrope, every policy but `"raise"`), returns what is
    recomputed: `"sequence"` when the cache has been reset in place and the caller feeds the whole
    sequence through it, `"rows"` when only some rows of the batch change and the forward pass recomputes those (it
    then needs the 2D attention mask). Returns `None` otherwise. `frequencies_per_row` is as in
    `prepare_rope_cache_update`.
    """
    policy = _generation_stale_cache_policy(config)
    if past_key_values is None or policy is None:
        return None
    record = RopeCacheRecord.of(past_key_values)
    cache_length = record.observe(past_key_values, config)
    if cache_length == 0 or input_ids.shape[1] <= cache_length:
        # Nothing cached yet, or a generation from embeddings, whose `input_ids` do not hold the prompt
        return None
    if record.inputs_are_known:
        bound_regimes = {rope_frequency_regime(config, length) for length in (cache_length + 1, input_ids.shape[1])}
        if bound_regimes == {record.regime}:
            # An ordinary decoding step: positions never exceed the index, so no row can need other frequencies
            return None
    positions = _generation_positions(attention_mask, position_ids, input_ids.shape[1])
    if not record.inputs_are_known:
        _relearn_cached_inputs(record, past_key_values, input_ids, positions, cache_length)

    # The first and the last new token may need different regimes (a verification chunk across the switch)
    new_length = input_ids.shape[1] - cache_length
    new_positions = positions[..., cache_length:] if positions is not None else None
    first_positions = new_positions[..., :1] if new_positions is not None else None
    first_regime = _needed_regime(config, record.regime, cache_length, 1, first_positions, frequencies_per_row)
    last_regime = _needed_regime(config, record.regime, cache_length, new_length, new_positions, frequencies_per_row)
    if policy != "recompute" or record.regime == first_regime == last_regime:
        # `forward` applies the other policies
        return None
    some_rows_unchanged = not all(_row_changes(record.regime, last_regime, input_ids.shape[0]))
    if first_regime == last_regime and some_rows_unchanged and enforced_stale_cache_policy(config) == "recompute":
        # Some rows keep their frequencies: `forward` recomputes only the others, from the 2D attention mask (which it
        # does under `"recompute"` alone; under the other policies the whole batch is fed again, as below)
        return "rows"
    _reset_cache(past_key_values)
    record.restart(regime=None, chunks=[])
    record.refed_new_length = new_length
    record.remember(past_key_values)
    return "sequence"


def positions_from_attention_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """
    The position of each token under a 2D attention mask (left padding): its index among the unmasked tokens of its
    row, and 0 for padding, as upstream's `generate()` gives them (`GenerationMixin`'s position ids). The one place
    the patches, their reference and their tests compute positions of a padded batch.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def _generation_positions(attention_mask, position_ids, length: int):
    """The positions `generate()` gives the first `length` tokens: explicit ones, or those of the attention mask."""
    if position_ids is not None and position_ids.shape[-1] >= length:
        return position_ids[..., :length]
    if _is_2d_attention_mask(attention_mask):
        return positions_from_attention_mask(attention_mask[:, :length])
    return None


def _relearn_cached_inputs(record: RopeCacheRecord, past_key_values, input_ids, positions, cache_length: int) -> None:
    """
    Gives `record` back the inputs its cache holds after `generate()` cropped or reordered it: the first
    `cache_length` tokens of the sequence, at `positions`.
    """
    prefix_positions = positions[..., :cache_length].clone() if positions is not None else None
    record.restart(record.regime, [_FedChunk(input_ids[:, :cache_length].clone(), None, prefix_positions, 0)])
    record.remember(past_key_values)


def _whole_sequence_inputs(model_inputs: dict, input_ids, attention_mask, position_ids) -> dict:
    """
    Turns the inputs `prepare_inputs_for_generation` made for the new tokens into inputs for the whole sequence, fed
    through the emptied cache. `logits_to_keep` counts from the end, so it still selects the new tokens' logits.
    """
    model_inputs = dict(model_inputs)
    length = input_ids.shape[1]
    model_inputs["input_ids"] = input_ids
    model_inputs["attention_mask"] = attention_mask
    if model_inputs.get("position_ids") is not None:
        positions = _generation_positions(attention_mask, position_ids, length)
        model_inputs["position_ids"] = positions if positions is not None else torch.arange(length)[None]
    if model_inputs.get("cache_position") is not None:
        model_inputs["cache_position"] = torch.arange(length, device=input_ids.device)
    return model_inputs


# 10. The decorators


def _positional_parameter_names(method) -> list[str]:
    """Names of the parameters of `method` that can be passed by position, after `self`."""
    parameters = list(inspect.signature(method).parameters.values())[1:]
    return [parameter.name for parameter in parameters if parameter.kind == parameter.POSITIONAL_OR_KEYWORD]


def check_rope_cache(model_forward=None, *, frequencies_per_row: bool = True):
    """
    Decorator for the forward pass of a decoder model (`XxxModel.forward`) whose RoPE frequencies may depend on the
    sequence length. It applies the stale-cache policy to the cache the forward pass extends: with `"recompute"`, a
    cache filled with other frequencies is recomputed in place, in the caller's cache object, and the outputs are
    those of the caller's tokens only, so that heads and callers see exactly what they would see without cache.

    Models whose RoPE does not depend on the sequence length, and traced calls, go straight to `model_forward`.
    Legacy caches (tuples of per-layer `(key, value)` tuples), where the release accepts them, are followed from one
    returned tuple to the next.

    Used as `@check_rope_cache`, or as `@check_rope_cache(frequencies_per_row=False)` for a model whose rotary
    embedding chooses the frequencies of the whole batch by the cache index rather than each row's by its positions.
    """
    if model_forward is None:
        return partial(check_rope_cache, frequencies_per_row=frequencies_per_row)
    parameter_names = _positional_parameter_names(model_forward)

    @wraps(model_forward)
    def wrapper(self, *args, **kwargs):
        kwargs.update(zip(parameter_names, args))
        if enforced_stale_cache_policy(self.config) is None or kwargs.get("use_cache") is False:
            return model_forward(self, **kwargs)

        return_tuple = kwargs.get("return_dict") is False
        if return_tuple:
            kwargs["return_dict"] = True

        past_key_values = kwargs.get(cache_argument_name(kwargs))
        rope_cache_update = prepare_rope_cache_update(
            self.config, past_key_values, kwargs, self.get_input_embeddings(), frequencies_per_row
        )
        try:
            rope_cache_update.recompute_rows(self, model_forward, past_key_values)
            outputs = model_forward(self, **rope_cache_update.model_inputs)
        except BaseException:
            rope_cache_update.abandon(past_key_values)
            raise
        rope_cache_update.commit(outputs.past_key_values, self.get_input_embeddings())
        outputs = rope_cache_update.caller_outputs(outputs)
        return outputs.to_tuple() if return_tuple else outputs

    return wrapper


def split_at_rope_switch(causal_lm_forward=None, *, frequencies_per_row: bool = True):
    """
    Decorator for the forward pass of a causal LM whose decoder uses `check_rope_cache`: a chunk whose returned
    logits lie on both sides of a RoPE switch runs as two forward passes (see `split_inputs_at_rope_switch`), so that
    each token's logits are those of the sequence ending at it, as in token-by-token decoding without cache.
    `frequencies_per_row` is as in `check_rope_cache`.
    """
    if causal_lm_forward is None:
        return partial(split_at_rope_switch, frequencies_per_row=frequencies_per_row)
    parameter_names = _positional_parameter_names(causal_lm_forward)
    all_parameter_names = inspect.signature(causal_lm_forward).parameters
    logits_to_keep_name = next(
        (name for name in ("logits_to_keep", "num_logits_to_keep") if name in all_parameter_names), None
    )

    @wraps(causal_lm_forward)
    def wrapper(self, *args, **kwargs):
        kwargs.update(zip(parameter_names, args))
        parts = split_inputs_at_rope_switch(self.config, kwargs, logits_to_keep_name, frequencies_per_row)
        if len(parts) == 1:
            return causal_lm_forward(self, **kwargs)

        return_tuple = kwargs.get("return_dict") is False
        part_outputs = []
        for part_inputs in parts:
            if return_tuple:
                part_inputs["return_dict"] = True
            cache_name = cache_argument_name(part_inputs)
            if part_outputs and _is_legacy_cache(part_inputs[cache_name]):
                # A legacy cache is not updated in place: the second part extends the one the first returned
                part_inputs[cache_name] = part_outputs[-1].past_key_values
            part_outputs.append(causal_lm_forward(self, **part_inputs))
        outputs = _concatenate_outputs(part_outputs)
        return outputs.to_tuple() if return_tuple else outputs

    return wrapper


def check_rope_cache_in_generation(prepare_inputs_for_generation=None, *, frequencies_per_row: bool = True):
    """
    Decorator for `prepare_inputs_for_generation` of models whose decoder uses `check_rope_cache`. On a step where
    the cache holds other RoPE frequencies than the coming forward pass needs, it resets the cache in place and feeds
    the whole sequence (like upstream's drop of the cache, but in the caller's cache object and on every path: beam
    search, assisted decoding, static caches, the reverse switch after a crop). This happens here, in eager mode, so
    that a compiled forward pass never has to. See `prepare_rope_cache_for_generation`; `frequencies_per_row` is as in
    `check_rope_cache`.
    """
    if prepare_inputs_for_generation is None:
        return partial(check_rope_cache_in_generation, frequencies_per_row=frequencies_per_row)
    parameter_names = _positional_parameter_names(prepare_inputs_for_generation)

    @wraps(prepare_inputs_for_generation)
    def wrapper(self, *args, **kwargs):
        named = dict(kwargs, **dict(zip(parameter_names, args)))
        input_ids, attention_mask, position_ids = (
            named["input_ids"],
            named.get("attention_mask"),
            named.get("position_ids"),
        )
        recomputed = None
        if named.get("inputs_embeds") is None:
            recomputed = prepare_rope_cache_for_generation(
                self.config,
                named.get(cache_argument_name(named)),
                input_ids,
                attention_mask,
                position_ids,
                frequencies_per_row,
            )
        model_inputs = prepare_inputs_for_generation(self, *args, **kwargs)
        if recomputed == "sequence":
            model_inputs = _whole_sequence_inputs(model_inputs, input_ids, attention_mask, position_ids)
            cache_key = cache_argument_name(model_inputs)
            if model_inputs.get(cache_key) is None:
                # The caller's cache, reset in place, where the model's own version dropped it (Phi-3 on 4.45)
                model_inputs[cache_key] = named.get(cache_argument_name(named))
        elif recomputed == "rows" and model_inputs.get("attention_mask") is not attention_mask:
            # The prepared mask covers the new tokens only; recomputing rows needs the 2D one
            model_inputs["attention_mask"] = attention_mask
        return model_inputs

    return wrapper
