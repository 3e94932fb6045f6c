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
"""The longrope cache recompute of the pull-request series, as `src/transformers/modeling_rope_utils.py` holds it."""

import inspect
from functools import wraps

import torch

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import is_torchdynamo_compiling, logging


logger = logging.get_logger(__name__)


def dynamic_rope_update(rope_forward):
    """
    Decorator function to update the RoPE parameters in the forward pass, if the model is using a dynamic RoPE
    (i.e. a RoPE implementation that may recompute its frequencies in the forward pass).

    Args:
        rope_forward (Callable):
            The forward pass of the RoPE implementation.

    Returns:
        The decorated forward pass.
    """

    def longrope_frequency_update(self, position_ids, device, layer_type=None):
        """Longrope uses long factor if sequence is larger than original pretraining length, short otherwise."""
        seq_len = torch.max(position_ids) + 1

        if layer_type is None:
            rope_type = self.rope_type
            original_inv_freq = self.original_inv_freq
            prefix = ""
            original_max_position_embeddings = self.config.rope_parameters["original_max_position_embeddings"]
        else:
            rope_type = self.rope_type[layer_type]
            original_inv_freq = getattr(self, f"{layer_type}_original_inv_freq")
            prefix = f"{layer_type}_"
            original_max_position_embeddings = self.config.rope_parameters[layer_type][
                "original_max_position_embeddings"
            ]

        long_inv_freq = getattr(self, f"{prefix}long_inv_freq", None)
        if long_inv_freq is None:
            rope_init_fn = ROPE_INIT_FUNCTIONS[rope_type]
            long_inv_freq, _ = rope_init_fn(
                self.config,
                device,
                seq_len=original_max_position_embeddings + 1,
                layer_type=layer_type,
            )
        # `long_inv_freq` is a plain attribute and does not follow `model.to(...)`, so move it here
        long_inv_freq = long_inv_freq.to(device)
        original_inv_freq = original_inv_freq.to(device)
        setattr(self, f"{prefix}long_inv_freq", long_inv_freq)

        # `seq_len` is a scalar, so this picks the long or short set for all positions, like an if/else but traceable
        inv_freq = torch.where(seq_len > original_max_position_embeddings, long_inv_freq, original_inv_freq)
        # Update in place so the buffer keeps its address, which CUDA graphs replay from
        getattr(self, f"{prefix}inv_freq").copy_(inv_freq)
        # Each row of a batch takes the set of its own length, as it would alone (left padding makes them differ)
        if position_ids.ndim != 2 or position_ids.shape[0] == 1 or is_torchdynamo_compiling():
            return None
        row_seq_len = position_ids.amax(dim=-1)[:, None, None] + 1
        row_inv_freq = torch.where(row_seq_len > original_max_position_embeddings, long_inv_freq, original_inv_freq)
        # In the buffer's dtype, as a row alone reads it (a half-precision model rounds `inv_freq`)
        return row_inv_freq.to(getattr(self, f"{prefix}inv_freq").dtype)

    def dynamic_frequency_update(self, position_ids, device, layer_type=None):
        """
        dynamic RoPE layers should recompute `inv_freq` in the following situations:
        1 - growing beyond the cached sequence length (allow scaling)
        2 - the current sequence length is in the original scale (avoid losing precision with small sequences)
        """
        seq_len = torch.max(position_ids) + 1
        if layer_type is None:
            rope_type = self.rope_type
            max_seq_len_cached = self.max_seq_len_cached
            original_inv_freq = self.original_inv_freq
            prefix = ""
        else:
            rope_type = self.rope_type[layer_type]
            max_seq_len_cached = getattr(self, f"{layer_type}_max_seq_len_cached", self.max_seq_len_cached)
            original_inv_freq = getattr(self, f"{layer_type}_original_inv_freq")
            prefix = f"{layer_type}_"

        if seq_len > max_seq_len_cached:  # growth
            rope_init_fn = ROPE_INIT_FUNCTIONS[rope_type]
            inv_freq, self.attention_scaling = rope_init_fn(
                self.config,
                device,
                seq_len=seq_len,
                layer_type=layer_type,
            )
            # TODO joao: may break with compilation
            self.register_buffer(f"{prefix}inv_freq", inv_freq, persistent=False)
            setattr(self, f"{prefix}max_seq_len_cached", seq_len)

        if seq_len < self.original_max_seq_len and max_seq_len_cached > self.original_max_seq_len:  # reset
            # This .to() is needed if the model has been moved to a device after being initialized (because
            # the buffer is automatically moved, but not the original copy)
            original_inv_freq = original_inv_freq.to(device)
            self.register_buffer(f"{prefix}inv_freq", original_inv_freq, persistent=False)
            setattr(self, f"{prefix}original_inv_freq", original_inv_freq)
            setattr(self, f"{prefix}max_seq_len_cached", self.original_max_seq_len)

    def rope_forward_per_row(self, x, position_ids, row_inv_freq, **kwargs):
        """`inv_freq` multiplies `position_ids[..., None]`: `row_inv_freq` of shape `(batch_size, 1, dim // 2)` rotates
        each row with its own frequencies in one pass, and the buffer itself is not written."""
        name = "inv_freq" if "layer_type" not in kwargs else f"{kwargs['layer_type']}_inv_freq"
        inv_freq = self._buffers[name]
        self._buffers[name] = row_inv_freq
        try:
            return rope_forward(self, x, position_ids, **kwargs)
        finally:
            self._buffers[name] = inv_freq

    @wraps(rope_forward)
    def wrapper(self, x, position_ids, layer_type=None):
        rope_type = self.rope_type if layer_type is None else self.rope_type[layer_type]
        kwargs = {"layer_type": layer_type} if layer_type is not None else {}
        if "dynamic" in rope_type:
            dynamic_frequency_update(self, position_ids, device=x.device, **kwargs)
        elif rope_type == "longrope":
            row_inv_freq = longrope_frequency_update(self, position_ids, device=x.device, **kwargs)
            if row_inv_freq is not None:
                return rope_forward_per_row(self, x, position_ids, row_inv_freq, **kwargs)
        return rope_forward(self, x, position_ids, **kwargs)

    return wrapper


def longrope_switch_length(config) -> int | None:
    """
    The sequence length up to which a longrope model rotates with its short factors
    (`original_max_position_embeddings`), or `None` when its RoPE does not switch factors.
    """
    rope_parameters = getattr(config.get_text_config(), "rope_parameters", None) or {}
    # One set of parameters, or one per layer type
    parameter_sets = [rope_parameters] if "rope_type" in rope_parameters else list(rope_parameters.values())
    switch_lengths = [
        parameters["original_max_position_embeddings"]
        for parameters in parameter_sets
        if isinstance(parameters, dict) and parameters.get("rope_type") == "longrope"
    ]
    return min(switch_lengths, default=None)


def recompute_cache_at_longrope_switch(model_forward):
    """
    Decorator for the `forward` of a decoder whose RoPE may be longrope, for decoding loops that call the model
    directly. The cache keeps the first `original_max_position_embeddings` ids fed through it. When a forward pass
    needs other factors than the keys in the cache were rotated with (the sequence crosses that length, or is cropped
    back to it or below), the cache is emptied in place, those ids are fed again with the new ones, and the outputs of
    the new tokens are returned.
    """
    signature = inspect.signature(model_forward)

    @wraps(model_forward)
    def wrapper(self, *args, **kwargs):
        # A compiled forward pass cannot branch on the cache length: `generate()` recomputes before it instead
        if is_torchdynamo_compiling() or (switch_length := longrope_switch_length(self.config)) is None:
            return model_forward(self, *args, **kwargs)
        # By name: the decorators below read some arguments by name
        bound = signature.bind(self, *args, **kwargs).arguments
        arguments = {**{name: value for name, value in bound.items() if name != "kwargs"}, **bound.get("kwargs", {})}
        cache = arguments.get("cache", arguments.get("past_key_values"))
        input_ids, attention_mask = arguments.get("input_ids"), arguments.get("attention_mask")
        batch_size, new_tokens = (input_ids if input_ids is not None else arguments["inputs_embeds"]).shape[:2]

        # An int: a static cache's length is a tensor it updates in place
        past_length = int(cache.get_seq_length()) if cache is not None else 0
        uses_long_factors = past_length + new_tokens > switch_length
        recorded_ids = _longrope_recorded_ids(cache, past_length, switch_length, batch_size)
        is_stale = past_length > 0 and cache._longrope_long_factors != uses_long_factors
        is_stale = is_stale and _can_feed_longrope_ids_again(input_ids, recorded_ids, attention_mask)
        if is_stale:
            cache.reset()
            arguments["input_ids"] = torch.cat([recorded_ids[:, :past_length], input_ids], dim=-1)
            arguments["position_ids"] = None
            if attention_mask is not None:
                arguments["position_ids"] = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)

        outputs = model_forward(**arguments)
        cache = getattr(outputs, "cache", None) if cache is None else cache
        if cache is not None and past_length <= switch_length:
            # The ids of the sequence up to the switch length: what a change of factors feeds again
            if input_ids is None or (past_length > 0 and recorded_ids is None):
                cache._longrope_input_ids = None
            else:
                prefix = [recorded_ids[:, :past_length]] if past_length > 0 else []
                cache._longrope_input_ids = torch.cat([*prefix, input_ids], dim=-1)[:, :switch_length]
        if cache is not None:
            cache._longrope_long_factors = uses_long_factors
        return _outputs_of_new_tokens(outputs, new_tokens) if is_stale else outputs

    return wrapper


def _can_feed_longrope_ids_again(input_ids, recorded_ids, attention_mask) -> bool:
    """Whether a cache whose factors are stale can be filled again from its ids; warns once why where it cannot."""
    if input_ids is not None and recorded_ids is not None and (attention_mask is None or attention_mask.ndim == 2):
        return True
    reason = "the cache was not filled from `input_ids` through this model"
    if input_ids is not None and recorded_ids is not None:
        reason = "the attention mask is 4D"
    logger.warning_once(
        f"The sequence crossed `original_max_position_embeddings`, where longrope switches factors, but the "
        f"cache cannot be recomputed ({reason}): the keys it holds keep the factors they were rotated with."
    )
    return False


def _longrope_recorded_ids(cache, past_length: int, switch_length: int, batch_size: int):
    """The ids `cache` recorded for its first tokens, if they cover what it holds up to the switch length."""
    recorded_ids = cache._longrope_input_ids if past_length > 0 else None
    if recorded_ids is None or recorded_ids.shape[1] < min(past_length, switch_length):
        return None
    return recorded_ids if recorded_ids.shape[0] == batch_size else None


def _outputs_of_new_tokens(outputs, new_tokens: int):
    """The outputs of the new tokens only, as the caller would get them from the cache it had before a recompute."""
    outputs.last_hidden_state = outputs.last_hidden_state[:, -new_tokens:]
    if outputs.get("hidden_states") is not None:
        outputs.hidden_states = tuple(hidden[:, -new_tokens:] for hidden in outputs.hidden_states)
    if outputs.get("attentions") is not None:
        outputs.attentions = tuple(weights[..., -new_tokens:, :] for weights in outputs.attentions)
    return outputs
