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
"""

import warnings
import weakref
from dataclasses import dataclass

import torch

from transformers.utils import is_torchdynamo_compiling

from .modeling_rope_utils import get_rope_type, longrope_uses_long_factors


STALE_CACHE_POLICIES = ("recompute", "warn", "raise", "ignore")
"""What to do when a cache computed with one set of RoPE frequencies meets a sequence that needs another:

- `"recompute"`: recompute the cached prefix with the new frequencies, in place in the caller's cache (exact);
- `"warn"`: keep the stale cache and warn once per cache, naming the position and the remedy;
- `"raise"`: raise a `StaleRopeCacheError` before the stale cache is used;
- `"ignore"`: keep the stale cache silently.
"""

SEQUENCE_DEPENDENT_ROPE_TYPES = ("longrope",)
"""RoPE types whose frequencies depend on the sequence length, and whose caches are therefore tracked."""

_stale_cache_policies = dict.fromkeys(SEQUENCE_DEPENDENT_ROPE_TYPES, "recompute")


class StaleRopeCacheError(RuntimeError):
    """A KV cache computed with one set of RoPE frequencies was about to be used with another."""


class StaleRopeCacheWarning(UserWarning):
    """A KV cache computed with one set of RoPE frequencies is being used with another."""


def normalize_stale_cache_policy(policy: str | dict[str, str]) -> dict[str, str]:
    """
    Validates a stale-cache policy and returns it as a mapping from RoPE type to policy.

    Args:
        policy (`str` or `dict[str, str]`):
            One of `STALE_CACHE_POLICIES` for every RoPE type, or a mapping from RoPE type to policy. RoPE types left
            out of the mapping keep the default, `"recompute"`.
    """
    if isinstance(policy, str):
        policy = dict.fromkeys(SEQUENCE_DEPENDENT_ROPE_TYPES, policy)
    if not isinstance(policy, dict):
        raise ValueError(
            f"`stale_cache` must be one of {STALE_CACHE_POLICIES} or a dict from RoPE type to one of them, "
            f"got {policy!r}."
        )
    unknown_types = sorted(set(policy) - set(SEQUENCE_DEPENDENT_ROPE_TYPES))
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
    return dict(dict.fromkeys(SEQUENCE_DEPENDENT_ROPE_TYPES, "recompute"), **policy)


def set_stale_cache_policy(policy: str | dict[str, str]) -> None:
    """Sets the process-wide stale-cache policy (see `normalize_stale_cache_policy` for the accepted values)."""
    _stale_cache_policies.update(normalize_stale_cache_policy(policy))


def get_stale_cache_policy(rope_type: str) -> str:
    """Returns the stale-cache policy in force for `rope_type`."""
    return _stale_cache_policies.get(rope_type, "ignore")


def _enforced_stale_cache_policy(config) -> str | None:
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


def rope_frequency_regime(config, sequence_length: int) -> str | None:
    """
    Names the set of RoPE frequencies a model with `config` uses for a sequence of `sequence_length` tokens, or
    returns `None` when its frequencies do not depend on the sequence length. Two forward passes with different
    regimes rotate the same position differently, so a cache filled in one regime is stale in the other.
    """
    if get_rope_type(config) == "longrope":
        return "long" if longrope_uses_long_factors(config, sequence_length) else "short"
    return None


def _first_layer_key_cache(cache) -> torch.Tensor | None:
    """The key tensor of the first cached layer, or `None` while the cache is empty."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        if len(layers) == 0 or not getattr(layers[0], "is_initialized", False):
            return None
        return layers[0].keys
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


def _tensor_state(tensor: torch.Tensor | None):
    """Host-side identity of a tensor's contents: a weak reference to the object and its in-place version counter."""
    if tensor is None:
        return None
    return weakref.ref(tensor), tensor._version


def _same_tensor_state(state, tensor: torch.Tensor | None) -> bool:
    if state is None or tensor is None:
        return state is None and tensor is None
    reference, version = state
    return reference() is tensor and tensor._version == version


@dataclass
class _FedChunk:
    """Inputs fed through a cache in one forward pass: token ids or embeddings, and their positions if given."""

    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    position_ids: torch.Tensor | None
    start: int

    @property
    def length(self) -> int:
        tensor = self.input_ids if self.input_ids is not None else self.inputs_embeds
        return tensor.shape[1]


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
        self.regime: str | None = None
        self.chunks: list[_FedChunk] | None = []
        self.warned = False
        self._key_state = None
        self._counter_state = None

    @classmethod
    def of(cls, cache) -> "RopeCacheRecord":
        """Returns the record kept on `cache`, creating an empty one if it has none."""
        record = getattr(cache, "_rope_cache_record", None)
        if record is None:
            record = cls()
            cache._rope_cache_record = record
        return record

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

        if counter is not None and _same_tensor_state(self._counter_state, counter):
            cache_length = self.length
        else:
            cache_length = cache.get_seq_length()
            if isinstance(cache_length, torch.Tensor):
                # One synchronisation, only after the cache was changed outside the model
                cache_length = int(cache_length)

        if cache_length == 0:
            self.restart(regime=None, chunks=[])
        else:
            if self.regime is None:
                # A cache filled without a record: assume one forward pass over its length, as upstream fills it
                self.regime = rope_frequency_regime(config, cache_length)
            self.chunks = None
            self.length = cache_length
        self.remember(cache)
        return cache_length

    def restart(self, regime: str | None, chunks: list[_FedChunk]):
        self.regime = regime
        self.chunks = chunks
        self.length = sum(chunk.length for chunk in chunks)

    def append(self, chunk: _FedChunk, regime: str | None):
        if self.chunks is not None:
            self.chunks.append(chunk)
            if len(self.chunks) >= _MAX_CHUNKS:
                self.chunks = _merge_chunks(self.chunks)
        self.length += chunk.length
        self.regime = regime

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
            position_ids = torch.cat([_chunk_positions(chunk, batch_size) for chunk in chunks], dim=-1)
        return input_ids, inputs_embeds, position_ids


_MAX_CHUNKS = 64
"""Decoding feeds one token per step: the record merges its chunks when it holds this many, to stay a short list."""


def _merge_chunks(chunks: list[_FedChunk]) -> list[_FedChunk]:
    """Concatenates runs of neighbouring chunks of the same kind (token ids or embeddings, with or without positions)."""

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


def _chunk_positions(chunk: _FedChunk, batch_size: int) -> torch.Tensor:
    if chunk.position_ids is not None:
        return chunk.position_ids.expand(batch_size, -1)
    device = (chunk.input_ids if chunk.input_ids is not None else chunk.inputs_embeds).device
    positions = torch.arange(chunk.start, chunk.start + chunk.length, device=device)
    return positions.unsqueeze(0).expand(batch_size, -1)


def _needed_regime(config, record: RopeCacheRecord, cache_length: int, new_length: int, position_ids) -> str | None:
    """
    The regime of a forward pass over `new_length` tokens after `cache_length` cached ones. The rotary embedding
    decides with `max(position_ids) + 1` on the device; positions never exceed a token's index in the sequence, so
    `cache_length + new_length` bounds it on the host. The exact value is read from the device only when the bound
    cannot settle the question: in the few steps around the switch point, when explicit positions lag behind the
    index (left padding in every row).
    """
    sequence_length_bound = cache_length + new_length
    regime_at_bound = rope_frequency_regime(config, sequence_length_bound)
    if position_ids is None or regime_at_bound == rope_frequency_regime(config, 1):
        return regime_at_bound
    if record.regime == regime_at_bound and cache_length >= record.length:
        # Positions only grow while the cache does: the regime the cache was last filled in still holds
        return regime_at_bound
    return rope_frequency_regime(config, int(position_ids.max()) + 1)


def _warn_stale_cache(record: RopeCacheRecord, cache_length: int, new_length: int, regime: str, rope_type: str):
    if record.warned:
        return
    record.warned = True
    warnings.warn(
        f"The KV cache holds {cache_length} tokens computed with the {record.regime} {rope_type} RoPE frequencies, "
        f"but the sequence is now {cache_length + new_length} tokens long and needs the {regime} ones: the cached "
        "keys and values are stale and the outputs will differ from a forward pass without cache. To recompute the "
        'cache exactly, use `stale_cache="recompute"`.',
        StaleRopeCacheWarning,
        stacklevel=3,
    )


def _stale_cache_error(record: RopeCacheRecord, cache_length: int, new_length: int, regime: str, reason: str):
    return StaleRopeCacheError(
        f"The KV cache holds {cache_length} tokens computed with the {record.regime} RoPE frequencies, but the "
        f"sequence is now {cache_length + new_length} tokens long and needs the {regime} ones. {reason}"
    )


class RopeCacheUpdate:
    """
    One forward pass through a cache, seen from the RoPE frequencies. Built before the forward pass by
    `prepare_rope_cache_update`, which recomputes a stale prefix when the policy says so; `commit` then records the
    pass on the cache once the model has run.
    """

    def __init__(self, model_inputs: dict, config=None, record=None, chunks=None, regime=None, restart=False):
        self.model_inputs = model_inputs
        self._config = config
        self._record = record
        self._chunks = chunks
        self._regime = regime
        self._restart = restart

    def commit(self, past_key_values) -> None:
        """Records the forward pass on `past_key_values`, the cache the model returned (if any)."""
        if past_key_values is None or self._config is None:
            return
        if self._chunks is None:
            # The model created this cache itself: its record starts with this forward pass
            chunk = _fed_chunk(self.model_inputs, start=0)
            regime = _needed_regime(self._config, RopeCacheRecord(), 0, chunk.length, chunk.position_ids)
            self._chunks, self._regime, self._restart = [chunk], regime, True
        record = RopeCacheRecord.of(past_key_values)
        if record is not self._record or self._restart:
            record.restart(self._regime, list(self._chunks))
        else:
            for chunk in self._chunks:
                record.append(chunk, self._regime)
        record.remember(past_key_values)


def _fed_chunk(model_inputs: dict, start: int) -> _FedChunk:
    """Copies the inputs of a forward pass for the record (callers may reuse their input buffers)."""
    input_ids, inputs_embeds, position_ids = (
        model_inputs["input_ids"],
        model_inputs["inputs_embeds"],
        model_inputs["position_ids"],
    )
    return _FedChunk(
        input_ids=input_ids.clone() if input_ids is not None else None,
        inputs_embeds=inputs_embeds.detach().clone() if input_ids is None else None,
        position_ids=position_ids.clone() if position_ids is not None else None,
        start=start,
    )


def prepare_rope_cache_update(
    config,
    past_key_values,
    input_ids: torch.LongTensor | None,
    inputs_embeds: torch.FloatTensor | None,
    position_ids: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    logits_to_keep: int | torch.Tensor,
    embedding_layer: torch.nn.Module,
) -> RopeCacheUpdate:
    """
    Checks a forward pass of a causal LM against the RoPE regime its cache was filled in, and applies the stale-cache
    policy. With `"recompute"`, a stale cache is reset in place and the inputs are extended with everything fed through
    it before, so that one forward pass refills the same cache object with the right frequencies; `logits_to_keep` is
    adjusted so that the caller still gets the logits of its own tokens only.

    Returns a `RopeCacheUpdate` whose `model_inputs` hold `input_ids`, `inputs_embeds`, `position_ids` and
    `logits_to_keep` for the forward pass, and whose `commit` must be called with the returned cache afterwards.
    """
    model_inputs = {
        "input_ids": input_ids,
        "inputs_embeds": inputs_embeds,
        "position_ids": position_ids,
        "logits_to_keep": logits_to_keep,
    }
    policy = _enforced_stale_cache_policy(config)
    if policy is None:
        return RopeCacheUpdate(model_inputs)

    if past_key_values is None:
        # Nothing to check; `commit` records the pass only if the model creates a cache
        return RopeCacheUpdate(model_inputs, config)

    new_inputs = input_ids if input_ids is not None else inputs_embeds
    new_length = new_inputs.shape[1]
    record = RopeCacheRecord.of(past_key_values)
    cache_length = record.observe(past_key_values, config)
    chunk = _fed_chunk(model_inputs, start=cache_length)
    regime = _needed_regime(config, record, cache_length, new_length, position_ids)
    if cache_length == 0 or record.regime == regime:
        return RopeCacheUpdate(model_inputs, config, record, [chunk], regime)

    if policy == "raise":
        raise _stale_cache_error(
            record, cache_length, new_length, regime, 'Use `stale_cache="recompute"` to recompute it exactly.'
        )
    if policy == "warn":
        _warn_stale_cache(record, cache_length, new_length, regime, get_rope_type(config))
        return RopeCacheUpdate(model_inputs, config, record, [chunk], regime)

    if not record.inputs_are_known:
        raise _stale_cache_error(
            record,
            cache_length,
            new_length,
            regime,
            "It cannot be recomputed: the cache was cropped, reordered or filled outside the model, so the inputs "
            "it holds are unknown. Run the whole sequence again without the cache (or with an empty one).",
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise _stale_cache_error(
            record,
            cache_length,
            new_length,
            regime,
            "Recomputing it needs a 2D attention mask over the whole sequence (or none), got a "
            f"{attention_mask.dim()}D mask.",
        )

    prefix_ids, prefix_embeds, prefix_positions = record.fed_inputs(embedding_layer)
    if prefix_ids is not None and input_ids is not None:
        model_inputs["input_ids"] = torch.cat([prefix_ids, input_ids], dim=1)
    else:
        prefix_embeds = prefix_embeds if prefix_embeds is not None else embedding_layer(prefix_ids)
        new_embeds = inputs_embeds if inputs_embeds is not None else embedding_layer(input_ids)
        model_inputs["input_ids"] = None
        model_inputs["inputs_embeds"] = torch.cat([prefix_embeds, new_embeds], dim=1)
    if prefix_positions is not None or position_ids is not None:
        batch_size = new_inputs.shape[0]
        prefix_chunk = _FedChunk(prefix_ids, prefix_embeds, prefix_positions, start=0)
        model_inputs["position_ids"] = torch.cat(
            [_chunk_positions(prefix_chunk, batch_size), _chunk_positions(chunk, batch_size)], dim=-1
        )
    if isinstance(logits_to_keep, int):
        model_inputs["logits_to_keep"] = new_length if logits_to_keep == 0 else min(logits_to_keep, new_length)
    else:
        model_inputs["logits_to_keep"] = logits_to_keep + cache_length

    past_key_values.reset()
    return RopeCacheUpdate(model_inputs, config, record, [*record.chunks, chunk], regime, restart=True)


def refresh_rope_cache_for_generation(config, past_key_values, input_ids: torch.LongTensor, position_ids) -> bool:
    """
    Checks the cache `generate()` is about to extend with `input_ids` (the whole sequence so far) and applies the
    stale-cache policy. Returns `True` when the cache was reset in place and the whole sequence must be fed through
    it, `False` when the cache can be used as it is.
    """
    policy = _enforced_stale_cache_policy(config)
    if past_key_values is None or policy is None:
        return False

    record = RopeCacheRecord.of(past_key_values)
    cache_length = record.observe(past_key_values, config)
    if cache_length == 0:
        return False
    new_length = input_ids.shape[1] - cache_length
    new_positions = position_ids[..., cache_length:] if position_ids is not None else None
    # The first and the last new token may need different regimes (a chunk across the switch, which `forward` splits)
    first_regime = _needed_regime(
        config, record, cache_length, 1, new_positions[..., :1] if new_positions is not None else None
    )
    regime = _needed_regime(config, record, cache_length, new_length, new_positions)
    if record.regime == first_regime == regime:
        return False
    regime = regime if first_regime == record.regime else first_regime

    if policy == "raise":
        raise _stale_cache_error(
            record, cache_length, new_length, regime, 'Use `stale_cache="recompute"` to recompute it exactly.'
        )
    if policy == "warn":
        _warn_stale_cache(record, cache_length, new_length, regime, get_rope_type(config))
        return False

    past_key_values.reset()
    record.restart(regime=None, chunks=[])
    record.remember(past_key_values)
    return True


def split_inputs_at_rope_switch(
    config,
    past_key_values,
    input_ids: torch.LongTensor | None,
    inputs_embeds: torch.FloatTensor | None,
    position_ids: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    logits_to_keep: int | torch.Tensor,
) -> list[dict]:
    """
    Splits the inputs of a forward pass through a cache where the tokens whose logits are returned lie on both sides
    of a RoPE switch (a verification chunk in assisted decoding, a multi-token step of a hand-written loop). Without
    cache, each of those logits would come from a forward pass over the sequence up to its token, with the
    frequencies of that length; one forward pass over the whole chunk would give them all the frequencies of the
    longest. The chunk is therefore run as two forward passes through the same cache: the tokens before the switch,
    then the others (which recompute the cache, by the policy).

    Returns a list of one or two dicts of forward-pass inputs (`input_ids`, `inputs_embeds`, `position_ids`,
    `attention_mask`, `logits_to_keep`), whose logits, concatenated, are the logits the caller asked for.
    """
    inputs = {
        "input_ids": input_ids,
        "inputs_embeds": inputs_embeds,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "logits_to_keep": logits_to_keep,
    }
    if (
        past_key_values is None
        or _enforced_stale_cache_policy(config) in (None, "warn")
        or not isinstance(logits_to_keep, int)
        or (attention_mask is not None and attention_mask.dim() != 2)
    ):
        return [inputs]
    new_length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
    kept_length = new_length if logits_to_keep == 0 else min(logits_to_keep, new_length)
    if kept_length < 2:
        return [inputs]

    cache_length = RopeCacheRecord.of(past_key_values).observe(past_key_values, config)
    # Host-side bounds on the sequence lengths of the first kept token and of the last token
    first_kept_regime = rope_frequency_regime(config, cache_length + new_length - kept_length + 1)
    if first_kept_regime == rope_frequency_regime(config, cache_length + new_length):
        return [inputs]
    if position_ids is None:
        sequence_lengths = range(cache_length + 1, cache_length + new_length + 1)
    else:
        # Read once, at the switch: explicit positions may lag behind the index (left padding)
        sequence_lengths = (position_ids.reshape(-1, new_length).amax(dim=0) + 1).tolist()
    regimes = [rope_frequency_regime(config, length) for length in sequence_lengths]
    split = next((index for index, regime in enumerate(regimes) if regime != regimes[0]), new_length)
    kept_before_split = kept_length - (new_length - split)
    if split in (0, new_length) or kept_before_split < 1:
        return [inputs]

    def part(start: int, end: int, kept: int) -> dict:
        return {
            "input_ids": input_ids[:, start:end] if input_ids is not None else None,
            "inputs_embeds": inputs_embeds[:, start:end] if inputs_embeds is not None else None,
            "position_ids": position_ids[..., start:end] if position_ids is not None else None,
            "attention_mask": attention_mask[:, : cache_length + end] if attention_mask is not None else None,
            "logits_to_keep": kept,
        }

    return [part(0, split, kept_before_split), part(split, new_length, new_length - split)]
