"""
The RoPE frequency updates the patches bind on every release, for rotary embeddings whose frequencies depend on the
sequence length: longrope by the length of each row, dynamic NTK at the current length, packed sequences (continuous
batching) by each sequence's own length. They read the configs and rotary embeddings of every release the range
admits (`rope_scaling` before 5.0, `rope_kwargs` before 4.48), so they are the patches' code. On the release the
series is written for, longrope is the series' own update (`modeling_overrides`) wherever that one rotates each row.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import wraps
from typing import ClassVar

import torch

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import is_torchdynamo_compiling


def get_rope_type(config) -> str:
    """Returns the RoPE type of `config` (`"default"` when it has no RoPE scaling)."""
    rope_parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope_parameters.get("rope_type", rope_parameters.get("type", "default"))


def get_longrope_switch_point(config) -> int:
    """
    Returns the sequence length up to which a longrope model uses its short factors: its
    `original_max_position_embeddings`. Sequences longer than this use the long factors.
    """
    rope_parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    switch_point = rope_parameters.get("original_max_position_embeddings")
    if switch_point is None:
        switch_point = getattr(config, "original_max_position_embeddings", None)
    if switch_point is None:
        raise ValueError(
            "A longrope config needs `original_max_position_embeddings`, the sequence length at which the long "
            "factors take over; found none in `rope_parameters` nor on the config."
        )
    return int(switch_point)


def longrope_uses_long_factors(config, sequence_length: int) -> bool:
    """
    The one rule for longrope: a sequence of `sequence_length` tokens is rotated with the long factors if and only if
    it is longer than `original_max_position_embeddings`. The frequency update below and the cache bookkeeping in
    `rope_cache_utils` both decide with it.
    """
    return sequence_length > get_longrope_switch_point(config)


def inverse_frequencies(config, sequence_length: int, device=None) -> torch.Tensor:
    """
    The inverse frequencies a model with `config` rotates a sequence of `sequence_length` tokens with, as a fresh
    model computes them: for longrope the short or the long factors (the rule of `longrope_uses_long_factors`), for
    dynamic NTK the base scaled for that length. Used to move cached keys from one set to another.
    """
    rope_type = get_rope_type(config)
    if rope_type == "longrope":
        rope_parameters = getattr(config, "rope_parameters", None) or config.rope_scaling
        factors = rope_parameters[
            "long_factor" if longrope_uses_long_factors(config, sequence_length) else "short_factor"
        ]
        base = rope_parameters.get("rope_theta", getattr(config, "rope_theta", None))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
        # The longrope frequencies, as `_compute_longrope_parameters` defines them
        inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        return 1.0 / (torch.tensor(factors, dtype=torch.float32, device=device) * base**inv_freq_shape)
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len=sequence_length)
    return inv_freq


def longrope_frequency_update(self, position_ids, device, layer_type=None):
    """
    Longrope uses the long factors if the sequence is longer than the original pretraining length, the short ones
    otherwise. The choice is made on the device with `torch.where` and written in place into `inv_freq`: no
    device->host synchronisation, and the buffer keeps its address so that compiled graphs and CUDA graphs can replay
    it. The sequence length is `max(position_ids) + 1`, the rule `longrope_uses_long_factors` states.
    """
    prefix = "" if layer_type is None else f"{layer_type}_"
    rope_type = self.rope_type if layer_type is None else self.rope_type[layer_type]
    switch_point = (
        get_longrope_switch_point(self.config)
        if layer_type is None
        else int(self.config.rope_parameters[layer_type]["original_max_position_embeddings"])
    )

    # Both sets are computed once, for a short and for a long sequence: the initial `inv_freq` is the long set in
    # releases before 4.48 when `max_position_embeddings` exceeds the switch point
    factor_sets = []
    for name, sequence_length in (("short_inv_freq", 1), ("long_inv_freq", switch_point + 1)):
        factor_set = getattr(self, f"{prefix}{name}", None)
        if factor_set is None:
            rope_init_fn = ROPE_INIT_FUNCTIONS[rope_type]
            init_kwargs = {} if layer_type is None else {"layer_type": layer_type}
            factor_set, _ = rope_init_fn(self.config, device, seq_len=sequence_length, **init_kwargs)
        if factor_set.device != device:
            # A plain attribute, which `model.to(...)` does not move
            factor_set = factor_set.to(device)
        setattr(self, f"{prefix}{name}", factor_set)
        factor_sets.append(factor_set)
    short_inv_freq, long_inv_freq = factor_sets

    inv_freq = getattr(self, f"{prefix}inv_freq")
    if inv_freq is getattr(self, f"{prefix}original_inv_freq", None) or inv_freq is long_inv_freq:
        # Some releases start with `inv_freq` and `original_inv_freq` as one tensor (and older updates may have made
        # it `long_inv_freq`): give `inv_freq` storage of its own once, so that the copy below overwrites neither
        inv_freq = inv_freq.clone()
        self.register_buffer(f"{prefix}inv_freq", inv_freq, persistent=False)

    # The sequence length is a 0-d tensor on the device: `torch.where` picks the set without reading it on the host
    sequence_length = torch.max(position_ids) + 1
    inv_freq.copy_(torch.where(sequence_length > switch_point, long_inv_freq, short_inv_freq))


def dynamic_frequency_update(self, position_ids, device, layer_type=None):
    """
    dynamic RoPE layers should recompute `inv_freq` in the following situations:
    1 - the sequence is longer than the original maximum, and of another length than `inv_freq` was scaled for (allow
        scaling). The frequencies are those of the current length, as a fresh model computes them, not of the longest
        sequence seen so far: after assisted decoding rejects candidate tokens, or a cache is cropped, they are scaled
        for the tokens actually in the sequence, and a forward pass depends on its inputs alone.
    2 - the current sequence length is in the original scale (avoid losing precision with small sequences)
    """
    prefix = "" if layer_type is None else f"{layer_type}_"
    rope_type = self.rope_type if layer_type is None else self.rope_type[layer_type]
    max_seq_len_cached = getattr(self, f"{prefix}max_seq_len_cached", self.max_seq_len_cached)
    original_inv_freq = getattr(self, f"{prefix}original_inv_freq")
    sequence_length = torch.max(position_ids) + 1

    if sequence_length > self.original_max_seq_len and sequence_length != max_seq_len_cached:  # scaled for this length
        rope_init_fn = ROPE_INIT_FUNCTIONS[rope_type]
        init_kwargs = {} if layer_type is None else {"layer_type": layer_type}
        # Before 4.48 a rotary embedding may be built from arguments instead of a config; it keeps them here
        init_kwargs.update(getattr(self, "rope_kwargs", {}))
        inv_freq, self.attention_scaling = rope_init_fn(self.config, device, seq_len=sequence_length, **init_kwargs)
        self.register_buffer(f"{prefix}inv_freq", inv_freq, persistent=False)
        setattr(self, f"{prefix}max_seq_len_cached", sequence_length)

    if sequence_length < self.original_max_seq_len and max_seq_len_cached > self.original_max_seq_len:  # reset
        # `original_inv_freq` is a plain attribute in some releases, which `model.to(...)` does not move
        original_inv_freq = original_inv_freq.to(device)
        self.register_buffer(f"{prefix}inv_freq", original_inv_freq, persistent=False)
        setattr(self, f"{prefix}original_inv_freq", original_inv_freq)
        setattr(self, f"{prefix}max_seq_len_cached", self.original_max_seq_len)


def longrope_forward_per_row(self, rope_forward, x, position_ids, layer_type=None):
    """
    Longrope for a batch whose rows have their own positions (left padding): each row is rotated with the factors of
    its own length, `max` of its positions + 1, as it would be decoded alone. A short row thus keeps the short factors
    while a longer row of the same batch has crossed the switch. The rotary forward runs once with each factor set
    and each row takes its own result: no device->host synchronisation, and a row alone gets the same numbers.
    """
    prefix = "" if layer_type is None else f"{layer_type}_"
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    switch_point = (
        get_longrope_switch_point(self.config)
        if layer_type is None
        else int(self.config.rope_parameters[layer_type]["original_max_position_embeddings"])
    )
    inv_freq = getattr(self, f"{prefix}inv_freq")
    batch_inv_freq = inv_freq.clone()
    rotations = []
    for factor_set in (f"{prefix}short_inv_freq", f"{prefix}long_inv_freq"):
        inv_freq.copy_(getattr(self, factor_set))
        rotations.append(rope_forward(self, x, position_ids, **kwargs))
    inv_freq.copy_(batch_inv_freq)
    short_rotation, long_rotation = rotations
    row_uses_long_factors = position_ids.amax(dim=-1) + 1 > switch_point
    return _select_rotation(row_uses_long_factors, long_rotation, short_rotation)


def _select_rotation(condition, chosen, other):
    """
    `torch.where(condition, chosen, other)` for each tensor a rotary `forward` returns: `(cos, sin)`, or the one
    complex `freqs_cis` of DeepSeek-V2 and Llama 4. `condition` is per row (`(batch_size,)`) or per token (shaped like
    `position_ids`), and broadcast over the rest.
    """

    def select(chosen_tensor, other_tensor):
        shape = (*condition.shape, *([1] * (chosen_tensor.dim() - condition.dim())))
        return torch.where(condition.view(shape), chosen_tensor, other_tensor)

    if isinstance(chosen, torch.Tensor):
        return select(chosen, other)
    return tuple(select(chosen_tensor, other_tensor) for chosen_tensor, other_tensor in zip(chosen, other))


@dataclass(frozen=True)
class PackedSequenceLengths:
    """
    The length of the sequence each token belongs to, for a row that packs several sequences (continuous batching):
    `per_token` on the device, shaped like `position_ids`, and the same lengths on the host (`distinct`), so that the
    rotation picks its frequency sets without a device->host synchronisation. A sequence's length is every token known
    for it, the ones still to prefill included: a prompt prefilled in chunks is rotated as it would be in one piece.
    """

    per_token: torch.Tensor
    distinct: tuple[int, ...]

    # What `packed_sequence_lengths` set for the running thread (a context variable: each thread has its own)
    current: ClassVar[ContextVar] = ContextVar("packed_sequence_lengths", default=None)


@contextmanager
def packed_sequence_lengths(lengths: "PackedSequenceLengths") -> Iterator[None]:
    """Rotary embeddings called inside this context rotate each token by its own sequence's length (per thread;
    `None` for none)."""
    token = PackedSequenceLengths.current.set(lengths)
    try:
        yield
    finally:
        PackedSequenceLengths.current.reset(token)


def current_packed_sequence_lengths() -> "PackedSequenceLengths":
    """The lengths `packed_sequence_lengths` set for this thread (`None` outside it, and while compiling: a context
    variable cannot be traced, so a compiled forward pass rotates its rows as a whole)."""
    if is_torchdynamo_compiling():
        return None
    return PackedSequenceLengths.current.get()


def _frequency_groups(self, lengths: "PackedSequenceLengths") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """
    The inverse frequencies of the lengths in a packed row, each with the mask of its tokens: longrope's short and long
    sets, or, for dynamic NTK, the original set and one set per length beyond the original maximum.
    """
    per_token = lengths.per_token
    if self.rope_type == "longrope":
        switch_point = get_longrope_switch_point(self.config)
        return [(per_token <= switch_point, self.short_inv_freq), (per_token > switch_point, self.long_inv_freq)]
    device = per_token.device
    groups = [(per_token <= self.original_max_seq_len, self.original_inv_freq.to(device))]
    for length in sorted(set(lengths.distinct)):
        if length > self.original_max_seq_len:
            inv_freq, _ = ROPE_INIT_FUNCTIONS[self.rope_type](self.config, device, seq_len=length)
            groups.append((per_token == length, inv_freq))
    return groups


def rope_forward_per_sequence(self, rope_forward, x, position_ids, lengths: "PackedSequenceLengths"):
    """
    RoPE for a row that packs several sequences (`lengths`): each token is rotated with the frequencies of its own
    sequence's length, as that sequence would be alone. The rotary forward runs once per frequency set, and each
    token takes its own result; `inv_freq` is left as it was.
    """
    inv_freq = self.inv_freq
    row_inv_freq = inv_freq.clone()
    rotation = None
    for mask, group_inv_freq in _frequency_groups(self, lengths):
        inv_freq.copy_(group_inv_freq)
        group_rotation = rope_forward(self, x, position_ids)
        rotation = group_rotation if rotation is None else _select_rotation(mask, group_rotation, rotation)
    inv_freq.copy_(row_inv_freq)
    return rotation


def dynamic_rope_update(rope_forward, series_longrope_update: bool = False):
    """
    Decorator function to update the RoPE parameters in the forward pass, if the model is using a dynamic RoPE
    (i.e. a RoPE implementation that may recompute its frequencies in the forward pass).

    Args:
        rope_forward (Callable):
            The forward pass of the RoPE implementation.
        series_longrope_update (bool):
            Longrope runs the pull-request series' decorator (`modeling_overrides`), as upstream will once it is
            merged: on the release the series is written for. Packed sequences and compiled forward passes, which the
            series leaves to the whole batch, keep the patches' own per-sequence and per-row rotations.

    Returns:
        The decorated forward pass.
    """
    series_forward = None
    if series_longrope_update:
        from modeling_overrides.modeling_rope_utils import dynamic_rope_update as series_dynamic_rope_update

        series_forward = series_dynamic_rope_update(rope_forward)

    @wraps(rope_forward)
    def wrapper(self, x, position_ids, layer_type=None):
        rope_type = self.rope_type if layer_type is None else self.rope_type[layer_type]
        kwargs = {"layer_type": layer_type} if layer_type is not None else {}
        packed = current_packed_sequence_lengths()
        per_sequence = (
            rope_type in ("longrope", "dynamic")
            and layer_type is None
            and packed is not None
            and packed.per_token.shape == position_ids.shape
        )
        if (
            series_forward is not None
            and rope_type == "longrope"
            and not per_sequence
            and not is_torchdynamo_compiling()
        ):
            return series_forward(self, x, position_ids, **kwargs)
        if "dynamic" in rope_type:
            dynamic_frequency_update(self, position_ids, device=x.device, **kwargs)
        elif rope_type == "longrope":
            longrope_frequency_update(self, position_ids, device=x.device, **kwargs)
        if per_sequence:
            return rope_forward_per_sequence(self, rope_forward, x, position_ids, packed)
        if rope_type == "longrope" and position_ids.shape[0] > 1:
            return longrope_forward_per_row(self, rope_forward, x, position_ids, **kwargs)
        return rope_forward(self, x, position_ids, **kwargs)

    return wrapper
