"""The attributes of the installed transformers that the patches replace, and what replaces them."""

import inspect

import torch

from modeling_overrides import modeling_rope_utils
from modeling_overrides.models.phi3 import modeling_phi3 as phi3_overrides

from .binding import Binding, expect_parameters, original_attribute, with_super_of


PHI3_FORWARD_PARAMETERS = [
    "self",
    "input_ids",
    "attention_mask",
    "position_ids",
    "past_key_values",
    "inputs_embeds",
    "labels",
    "use_cache",
    "logits_to_keep",
    "kwargs",
]
PHI3_PREPARE_INPUTS_PARAMETERS = [
    "self",
    "input_ids",
    "past_key_values",
    "attention_mask",
    "inputs_embeds",
    "position_ids",
    "use_cache",
    "logits_to_keep",
    "kwargs",
]


def _rotary_forward_check(original) -> str | None:
    if original is None:
        return "the class does not define it"
    if not hasattr(original, "__wrapped__"):
        return "it is not wrapped by `dynamic_rope_update`, as the release this patch targets has it"
    found = list(inspect.signature(inspect.unwrap(original)).parameters)
    if found != ["self", "x", "position_ids"]:
        return f"its signature changed: expected parameters ['self', 'x', 'position_ids'], found {found}"
    return None


def _rotary_forward_replacement(original):
    # `forward` is decorated when its class is defined, so the decorator is re-applied to the undecorated function
    return torch.no_grad()(modeling_rope_utils.dynamic_rope_update(inspect.unwrap(original)))


def _generation_accepts_next_sequence_length() -> str | None:
    from transformers.generation import GenerationMixin

    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    if "next_sequence_length" not in parameters:
        return "`GenerationMixin.prepare_inputs_for_generation` does not take `next_sequence_length`"
    return None


def _phi3_prepare_inputs_check(original) -> str | None:
    return expect_parameters(PHI3_PREPARE_INPUTS_PARAMETERS)(original) or _generation_accepts_next_sequence_length()


def phi3_bindings(stale_cache_policy: dict[str, str]) -> list[Binding]:
    """Bindings for Phi-3: its longrope frequency update, and its causal LM when longrope caches are checked."""
    from transformers.models.phi3 import modeling_phi3

    bindings = [
        Binding(
            name="Phi3RotaryEmbedding.forward",
            owner=modeling_phi3.Phi3RotaryEmbedding,
            attribute="forward",
            replacement=_rotary_forward_replacement,
            check=_rotary_forward_check,
        )
    ]
    # With "ignore", Phi-3 keeps upstream's own handling of the switch (its cache reset in `generate()`)
    if stale_cache_policy["longrope"] != "ignore":
        causal_lm = modeling_phi3.Phi3ForCausalLM
        bindings += [
            Binding(
                name="Phi3ForCausalLM.forward",
                owner=causal_lm,
                attribute="forward",
                replacement=lambda original: phi3_overrides.Phi3ForCausalLM.forward,
                check=expect_parameters(PHI3_FORWARD_PARAMETERS),
            ),
            Binding(
                name="Phi3ForCausalLM.prepare_inputs_for_generation",
                owner=causal_lm,
                attribute="prepare_inputs_for_generation",
                replacement=lambda original: with_super_of(
                    phi3_overrides.Phi3ForCausalLM.prepare_inputs_for_generation, causal_lm
                ),
                check=_phi3_prepare_inputs_check,
            ),
        ]
    return bindings


def all_bindings(stale_cache_policy: dict[str, str]) -> list[Binding]:
    """Every binding the patches make on the installed transformers, for the given stale-cache policy."""
    return phi3_bindings(stale_cache_policy)


def current_attribute(binding: Binding):
    return original_attribute(binding.owner, binding.attribute)
