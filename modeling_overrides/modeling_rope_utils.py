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

from transformers.utils import is_torchdynamo_compiling, logging


logger = logging.get_logger(__name__)


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
