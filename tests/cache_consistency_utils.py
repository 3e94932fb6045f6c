"""
Shared helpers for the cache-consistency tests. The tiny models and the no-cache reference live in the package
(`patches.tiny_models`, `patches.reference`), where the self-check uses them too; they are re-exported here.
"""

import inspect
import unittest

import torch
from packaging.version import Version

import patches
from patches.reference import (  # noqa: F401
    CACHE_KEYWORD,
    FP32_TOLERANCE,
    LOGITS_TO_KEEP_ARGUMENT,
    generate_errors,
    hand_written_loop_errors,
    left_padded_batch,
    left_padded_generate_row_errors,
    no_cache_logits,
    row_alone_errors,
)
from patches.rope_cache_utils import positions_from_attention_mask, rope_frequency_regime
from patches.tiny_models import (  # noqa: F401
    DYNAMIC_NTK_FACTOR,
    LLAMA_7B_SHAPE,
    LONG_MSCALE,
    PHI3_MINI_128K_SHAPE,
    PHI3_MINI_SWITCH_POINT,
    SHORT_MSCALE,
    SWITCH_POINT,
    TINY_DECODER,
    TINY_IMAGE_SIZE,
    TRANSFORMERS_VERSION,
    longrope_factor_profile,
    new_cache,
    random_tokens,
    reset_dynamic_rope,
    rope_config,
    tiny_llama_config,
    tiny_llama_model,
    tiny_model,
    tiny_phi3_config,
    tiny_phi3_model,
    tiny_phi4_multimodal_model,
    tiny_phimoe_model,
    tiny_standard_model,
)
from transformers import Phi3ForCausalLM
from transformers.utils import logging


REPORTS_SPECULATIVE_LOGITS_PER_TOKEN = Version("4.45") <= TRANSFORMERS_VERSION
"""4.44's assisted decoding returns `output_logits` that do not line up with the tokens (seen even without RoPE
scaling); its generated tokens are still checked against no-cache greedy decoding."""

ACCEPTS_LEGACY_CACHE = Version("4.47.99") > TRANSFORMERS_VERSION
"""Up to 4.47, Phi-3 takes legacy caches (tuples of per-layer `(key, value)` tuples) and returns them as tuples."""


SUPPORTS_STATIC_CACHE_GENERATION = getattr(Phi3ForCausalLM, "_supports_static_cache", True)
"""`generate(cache_implementation="static")` and a caller's `StaticCache` in `generate()` exist for Phi-3 from 4.48."""


def cached_keys_and_values(cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value tensors a cache holds for one layer (`layers` from 4.56, `key_cache` lists before)."""
    if hasattr(cache, "layers"):
        return cache.layers[layer_idx].keys, cache.layers[layer_idx].values
    return cache.key_cache[layer_idx], cache.value_cache[layer_idx]


@torch.no_grad()
def cached_decoding_logits(model, input_ids, prompt_length: int) -> list[torch.Tensor]:
    """The logits of a prefill of `prompt_length` tokens, then of each further token fed alone through a cache."""
    cache = new_cache("dynamic", model.config)
    logits = [model(input_ids[:, :prompt_length], past_key_values=cache).logits]
    for position in range(prompt_length, input_ids.shape[1]):
        logits.append(model(input_ids[:, position : position + 1], past_key_values=cache).logits)
    return logits


@torch.no_grad()
def compiled_decode_step_errors(model, input_ids, prompt_length: int, max_cache_len: int, backend: str):
    """
    A hand-written loop whose decode steps run `torch.compile(model.forward, fullgraph=True, backend=backend)` over a
    static cache; the prompt is prefilled eagerly. The cache bookkeeping cannot run inside a graph, so the compiled
    steps leave the cache unrecorded: at the step whose sequence needs other frequencies, the loop feeds the whole
    sequence again, eagerly, through the emptied cache (the remedy `StaleRopeCacheError` names). Returns, for each
    sequence length after the prompt, the max |Δlogit| of the step against the forward pass without cache.
    """
    cache = new_cache("static", model.config, max_cache_len, device=model.device, dtype=model.dtype)
    takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters

    def forward(function, start: int, end: int):
        # Releases before 5.0 derive positions from `cache_position`, which `generate()` passes
        inputs = {"past_key_values": cache}
        if takes_cache_position:
            inputs["cache_position"] = torch.arange(start, end, device=model.device)
        return function(input_ids[:, start:end], **inputs).logits[:, -1]

    forward(model, 0, prompt_length)
    compiled_forward = torch.compile(model.forward, fullgraph=True, backend=backend)
    errors = {}
    for length in range(prompt_length + 1, input_ids.shape[1] + 1):
        if rope_frequency_regime(model.config, length) != rope_frequency_regime(model.config, length - 1):
            cache.reset()
            logits = forward(model, 0, length)
        else:
            logits = forward(compiled_forward, length - 1, length)
        reference = no_cache_logits(model, input_ids[:, :length])
        errors[length] = (logits.float() - reference.float()).abs().max().item()
    return errors


CONSISTENT_DECODING_AVAILABLE = Version("4.48") <= TRANSFORMERS_VERSION
"""`patches.apply(consistent=True)` needs the shared attention functions of 4.48 and later."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def left_padding_mask(batch_size: int, length: int) -> torch.LongTensor:
    """An attention mask whose rows after the first are left-padded by 3, 7 and 12 tokens."""
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    for row, padding in enumerate((0, 3, 7, 12)[:batch_size]):
        attention_mask[row, :padding] = 0
    return attention_mask


@torch.no_grad()
def bitwise_mismatches(model, input_ids, prompt_length: int, attention_mask=None, past_key_values=None) -> list[int]:
    """
    Feeds `input_ids[:, :prompt_length]` through a cache, then one token at a time, and returns the sequence lengths
    at which the decode step's logits differ in any bit from the forward pass without cache over the same tokens
    (same attention mask, same positions).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = positions_from_attention_mask(attention_mask)
    cache = past_key_values if past_key_values is not None else new_cache("dynamic", model.config)

    def inputs(start: int, end: int) -> dict:
        return {
            "input_ids": input_ids[:, start:end],
            "attention_mask": attention_mask[:, :end],
            "position_ids": positions[:, start:end],
        }

    model(**inputs(0, prompt_length), past_key_values=cache, use_cache=True)
    mismatches = []
    for length in range(prompt_length + 1, input_ids.shape[1] + 1):
        step_logits = model(**inputs(length - 1, length), past_key_values=cache, use_cache=True).logits[:, -1]
        reference = model(**inputs(0, length), use_cache=False).logits[:, -1]
        if not torch.equal(step_logits, reference):
            mismatches.append(length)
    return mismatches


@torch.no_grad()
def greedy_with_and_without_cache(model, input_ids, max_new_tokens: int, attention_mask=None):
    """Greedy `generate()` with a cache and with `use_cache=False`: both outputs (sequences and per-step logits)."""
    outputs = []
    for use_cache in (True, False):
        outputs.append(
            model.generate(
                input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=use_cache,
                pad_token_id=0,
                return_dict_in_generate=True,
                output_logits=True,
            )
        )
    return outputs


class LongRopeDecodingTesterMixin:
    """
    The decoding paths every longrope model is tested on across the switch, for a `unittest.TestCase` whose `setUp`
    builds `self.model` (a tiny longrope causal LM switching after `SWITCH_POINT` tokens): hand-written loops through
    a dynamic cache, a static cache and 3-token chunks, and greedy `generate()`, against the no-cache reference; and
    upstream's hand-written loop, stale.
    """

    def assertMatchesNoCache(self, errors):
        self.assertGreater(len(errors), 0)
        self.assertLessEqual(max(errors), FP32_TOLERANCE, f"max |Δlogit| per step: {errors}")

    def test_hand_written_loops_match_no_cache(self):
        for cache_kind, chunk_size in (("dynamic", 1), ("static", 1), ("dynamic", 3)):
            with self.subTest(cache=cache_kind, chunk_size=chunk_size), patches.applied():
                errors, _ = hand_written_loop_errors(
                    self.model,
                    random_tokens(SWITCH_POINT + 8),
                    SWITCH_POINT - 4,
                    past_key_values=new_cache(cache_kind, self.model.config),
                    chunk_size=chunk_size,
                )
                self.assertMatchesNoCache(errors)

    def test_hand_written_loop_with_the_deprecated_cache_keyword_matches_no_cache(self):
        if CACHE_KEYWORD == "past_key_values":
            self.skipTest("`past_key_values` is the cache keyword itself before 5.24, tested above")
        with patches.applied():
            errors, _ = hand_written_loop_errors(
                self.model,
                random_tokens(SWITCH_POINT + 4),
                SWITCH_POINT - 2,
                past_key_values=new_cache("dynamic", self.model.config),
                cache_keyword="past_key_values",
            )
        self.assertMatchesNoCache(errors)

    def test_upstream_hand_written_loop_is_stale(self):
        errors, _ = hand_written_loop_errors(self.model, random_tokens(SWITCH_POINT + 4), SWITCH_POINT - 2)
        self.assertGreater(max(errors), 0.1)

    def test_generate_matches_no_cache(self):
        with patches.applied():
            _, errors = generate_errors(self.model, random_tokens(SWITCH_POINT - 3), max_new_tokens=8, do_sample=False)
        self.assertMatchesNoCache(errors)


class QuietTestCase(unittest.TestCase):
    """transformers' notices (longrope's `original_max_position_embeddings`, lengths past the maximum) silenced."""

    @classmethod
    def setUpClass(cls):
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()
        cls.addClassCleanup(logging.set_verbosity, verbosity)
