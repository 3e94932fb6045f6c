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
"""Testing the Phi-3 KV cache across the longrope switch: every decoding path against the no-cache forward pass."""

import inspect
import shutil
import unittest
import warnings
from unittest import mock

import torch
from parameterized import parameterized

import patches
from patches import rope_cache_utils
from transformers import StaticCache
from transformers.testing_utils import (
    CaptureLogger,
    backend_empty_cache,
    require_torch,
    require_torch_accelerator,
    slow,
    torch_device,
)
from transformers.utils import logging

from ...cache_consistency_utils import (
    ACCEPTS_LEGACY_CACHE,
    CACHE_KEYWORD,
    CONSISTENT_DECODING_AVAILABLE,
    DTYPES,
    FP32_TOLERANCE,
    LOGITS_TO_KEEP_ARGUMENT,
    REPORTS_SPECULATIVE_LOGITS_PER_TOKEN,
    SUPPORTS_STATIC_CACHE_GENERATION,
    SWITCH_POINT,
    bitwise_mismatches,
    cached_decoding_logits,
    cached_keys_and_values,
    compiled_decode_step_errors,
    generate_errors,
    greedy_with_and_without_cache,
    hand_written_loop_errors,
    left_padded_batch,
    left_padded_generate_row_errors,
    left_padding_mask,
    new_cache,
    no_cache_logits,
    random_tokens,
    row_alone_errors,
    tiny_phi3_model,
)
from ...real_size_utils import (
    PHI3_MINI_SWITCH_POINT,
    decode_step_errors,
    load_checkpoint,
    local_checkpoint,
    long_text_ids,
    real_size_phi3_model,
)


BF16_NOISE_MARGIN = 2.0
"""
In bf16 a cached decode step differs from the forward pass without cache even with nothing stale (matrix products of
other shapes round differently; up to ~0.1 in the logits of a 7B model). The slow tests measure that drift on the
same model and device, on the steps before the switch, and accept up to `BF16_NOISE_MARGIN` times it after the
switch: an exact recompute adds no error of its own, while a stale cache must stand out from it.
"""


@require_torch
class Phi3LongRopeCacheTest(unittest.TestCase):
    def setUp(self):
        self.enterContext(patches.applied())
        self.model = tiny_phi3_model()

    def assertMatchesNoCache(self, errors):
        self.assertGreater(len(errors), 0)
        self.assertLessEqual(max(errors), FP32_TOLERANCE, f"max |Δlogit| per step: {errors}")

    def test_cache_contents_in_short_region_change_after_switch(self):
        # The upstream regression idea: once the switch is crossed, the keys cached for the first tokens are
        # recomputed with the long factors (and equal those of a fresh forward pass over the whole sequence).
        input_ids = random_tokens(SWITCH_POINT + 4)
        prompt_length = SWITCH_POINT - 2
        cache = new_cache("dynamic", self.model.config)
        with torch.no_grad():
            self.model(input_ids[:, :prompt_length], past_key_values=cache)
            short_keys = cached_keys_and_values(cache, 0)[0][:, :, :prompt_length].clone()
            for position in range(prompt_length, input_ids.shape[1]):
                self.model(input_ids[:, position : position + 1], past_key_values=cache)
            fresh = self.model(input_ids, past_key_values=new_cache("dynamic", self.model.config)).past_key_values

        self.assertFalse(torch.allclose(short_keys, cached_keys_and_values(cache, 0)[0][:, :, :prompt_length]))
        last_layer = self.model.config.num_hidden_layers - 1
        for cached, recomputed in zip(
            cached_keys_and_values(cache, last_layer), cached_keys_and_values(fresh, last_layer)
        ):
            torch.testing.assert_close(cached, recomputed, rtol=1e-5, atol=1e-5)

    @parameterized.expand(
        [
            ("dynamic_one_token", "dynamic", 1),
            ("dynamic_chunks_across_switch", "dynamic", 3),
            ("static_one_token", "static", 1),
            ("static_chunks_across_switch", "static", 3),
        ]
    )
    def test_hand_written_loop_matches_no_cache(self, _, cache_kind, chunk_size):
        input_ids = random_tokens(SWITCH_POINT + 10)
        cache = new_cache(cache_kind, self.model.config)
        errors, returned_cache = hand_written_loop_errors(
            self.model, input_ids, SWITCH_POINT - 4, past_key_values=cache, chunk_size=chunk_size
        )
        self.assertMatchesNoCache(errors)
        self.assertIs(returned_cache, cache)
        self.assertIs(type(returned_cache), type(cache))

    def test_hand_written_loop_with_the_deprecated_cache_keyword_matches_no_cache(self):
        # From 5.24 the keyword is `cache`; loops written for earlier releases pass `past_key_values`
        if CACHE_KEYWORD == "past_key_values":
            self.skipTest("`past_key_values` is the cache keyword itself before 5.24, tested above")
        for cache_kind in ("dynamic", "static"):
            with self.subTest(cache=cache_kind):
                cache = new_cache(cache_kind, self.model.config)
                errors, returned_cache = hand_written_loop_errors(
                    self.model,
                    random_tokens(SWITCH_POINT + 6),
                    SWITCH_POINT - 4,
                    past_key_values=cache,
                    cache_keyword="past_key_values",
                )
                self.assertMatchesNoCache(errors)
                self.assertIs(returned_cache, cache)

    def test_hand_written_loop_with_cache_created_by_the_model(self):
        errors, _ = hand_written_loop_errors(self.model, random_tokens(SWITCH_POINT + 6), SWITCH_POINT - 3)
        self.assertMatchesNoCache(errors)

    def test_hand_written_loop_from_inputs_embeds(self):
        input_ids = random_tokens(SWITCH_POINT + 4)
        prompt_length = SWITCH_POINT - 2
        embeddings = self.model.get_input_embeddings()
        with torch.no_grad():
            outputs = self.model(inputs_embeds=embeddings(input_ids[:, :prompt_length]), use_cache=True)
            cache = outputs.past_key_values
            errors = []
            for position in range(prompt_length, input_ids.shape[1]):
                outputs = self.model(input_ids[:, position : position + 1], past_key_values=cache)
                cache = outputs.past_key_values  # a legacy tuple cache (4.44-4.46) comes back as a new tuple
                reference = no_cache_logits(self.model, input_ids[:, : position + 1])
                errors.append((outputs.logits[:, -1] - reference).abs().max().item())
        self.assertMatchesNoCache(errors)

    def test_a_loop_alternating_token_ids_and_embeddings_keeps_a_short_record(self):
        # Chunks of ids and of embeddings cannot be merged with each other: the record folds them into embeddings
        switch_point = 160
        model = tiny_phi3_model(switch_point=switch_point, max_position_embeddings=2 * switch_point)
        input_ids = random_tokens(switch_point + 4)
        embeddings = model.get_input_embeddings()
        cache = new_cache("dynamic", model.config, max_cache_len=2 * switch_point)
        record_lengths, errors = [], []
        with torch.no_grad():
            model(input_ids[:, :2], past_key_values=cache)
            for position in range(2, input_ids.shape[1]):
                token = input_ids[:, position : position + 1]
                step_inputs = {"input_ids": token} if position % 2 else {"inputs_embeds": embeddings(token)}
                outputs = model(**step_inputs, past_key_values=cache)
                record_lengths.append(len(rope_cache_utils.RopeCacheRecord.of(cache).chunks))
                if position >= switch_point - 1:
                    reference = no_cache_logits(model, input_ids[:, : position + 1])
                    errors.append((outputs.logits[:, -1] - reference).abs().max().item())
        self.assertLess(max(record_lengths), rope_cache_utils._MAX_CHUNKS)
        self.assertMatchesNoCache(errors)

    @unittest.skipIf(LOGITS_TO_KEEP_ARGUMENT is None, "this release's Phi-3 always returns every logit")
    def test_logits_to_keep_is_honoured_when_recomputing(self):
        input_ids = random_tokens(SWITCH_POINT + 2)
        cache = new_cache("dynamic", self.model.config)
        with torch.no_grad():
            self.model(input_ids[:, :SWITCH_POINT], past_key_values=cache)
            outputs = self.model(input_ids[:, SWITCH_POINT:], past_key_values=cache, **{LOGITS_TO_KEEP_ARGUMENT: 1})
        self.assertEqual(outputs.logits.shape, (1, 1, self.model.config.vocab_size))
        reference = no_cache_logits(self.model, input_ids)
        self.assertLessEqual((outputs.logits[:, -1] - reference).abs().max().item(), FP32_TOLERANCE)

    @parameterized.expand(
        [
            ("greedy", {"do_sample": False}),
            ("sampling", {"do_sample": True, "top_k": 0}),
            ("static_cache_implementation", {"do_sample": False, "cache_implementation": "static"}),
        ]
    )
    def test_generate_matches_no_cache(self, _, generate_kwargs):
        if "cache_implementation" in generate_kwargs and not SUPPORTS_STATIC_CACHE_GENERATION:
            self.skipTest("this release's Phi-3 has no static-cache generation")
        torch.manual_seed(0)
        _, errors = generate_errors(self.model, random_tokens(SWITCH_POINT - 4), max_new_tokens=12, **generate_kwargs)
        self.assertMatchesNoCache(errors)

    def assertSpeculativeDecodingMatchesNoCache(self, prompt, **generate_kwargs):
        sequences, errors = generate_errors(self.model, prompt, do_sample=False, **generate_kwargs)
        with torch.no_grad():
            greedy = self.model.generate(
                prompt,
                max_new_tokens=generate_kwargs["max_new_tokens"],
                do_sample=False,
                use_cache=False,
                pad_token_id=0,
            )
        self.assertTrue(torch.equal(sequences, greedy), "speculative decoding must reproduce no-cache greedy decoding")
        if REPORTS_SPECULATIVE_LOGITS_PER_TOKEN:
            self.assertMatchesNoCache(errors)

    @parameterized.expand([(3,), (6,)])
    def test_prompt_lookup_decoding_matches_no_cache(self, num_candidates):
        # A repetitive prompt makes prompt lookup propose candidates; some chunks straddle the switch and
        # rejected candidates get the cache cropped.
        half = random_tokens(SWITCH_POINT // 2 - 2)
        prompt = torch.cat([half, half], dim=-1)
        self.assertSpeculativeDecodingMatchesNoCache(
            prompt, max_new_tokens=16, prompt_lookup_num_tokens=num_candidates
        )

    def test_assisted_decoding_matches_no_cache(self):
        assistant = tiny_phi3_model(seed=1)
        self.assertSpeculativeDecodingMatchesNoCache(
            random_tokens(SWITCH_POINT - 3), max_new_tokens=12, assistant_model=assistant
        )

    @unittest.skipUnless(SUPPORTS_STATIC_CACHE_GENERATION, "this release's Phi-3 has no static-cache generation")
    def test_generate_keeps_the_callers_static_cache(self):
        cache = new_cache("static", self.model.config, 2 * SWITCH_POINT)
        with torch.no_grad():
            outputs = self.model.generate(
                random_tokens(SWITCH_POINT - 4),
                past_key_values=cache,
                max_new_tokens=10,
                do_sample=False,
                return_dict_in_generate=True,
                pad_token_id=0,
                # The padding token embeds to zeros, which some releases' `get_seq_length` would not count
                bad_words_ids=[[0]],
            )
        self.assertIs(outputs.past_key_values, cache)
        self.assertIs(type(outputs.past_key_values), StaticCache)
        self.assertEqual(int(cache.get_seq_length()), SWITCH_POINT - 4 + 9)

    def test_beam_search_matches_no_cache_beam_search(self):
        prompt = random_tokens(SWITCH_POINT - 4)
        with torch.no_grad():
            kwargs = {"max_new_tokens": 10, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
            with_cache = self.model.generate(prompt, **kwargs)
            without_cache = self.model.generate(prompt, use_cache=False, **kwargs)
        self.assertTrue(torch.equal(with_cache, without_cache))

    def test_left_padded_batch_generate_matches_no_cache(self):
        prompt = random_tokens(SWITCH_POINT - 3, batch_size=2)
        attention_mask = torch.ones_like(prompt)
        attention_mask[1, :5] = 0
        prompt[1, :5] = self.model.config.pad_token_id
        _, errors = generate_errors(
            self.model, prompt, attention_mask=attention_mask, max_new_tokens=8, do_sample=False
        )
        self.assertMatchesNoCache(errors)

    @parameterized.expand([("greedy", {}), ("static_cache", {"cache_implementation": "static"})])
    def test_each_row_of_a_left_padded_batch_matches_that_row_alone(self, _, generate_kwargs):
        # The first row crosses the switch after 3 steps, the second, 6 tokens shorter, after 9: in between, each row
        # keeps the factors of its own length, as it would decoded alone.
        if "cache_implementation" in generate_kwargs and not SUPPORTS_STATIC_CACHE_GENERATION:
            self.skipTest("this release's Phi-3 has no static-cache generation")
        # Each row crosses while the other does not: only that row is recomputed, the cache is never reset
        reset = mock.patch.object(rope_cache_utils, "_reset_cache", wraps=rope_cache_utils._reset_cache)
        with reset as reset_calls:
            errors = left_padded_generate_row_errors(self.model, **generate_kwargs)
        self.assertMatchesNoCache(errors)
        self.assertEqual(reset_calls.call_count, 0)

    def test_each_row_matches_that_row_alone_in_a_hand_written_loop(self):
        prompt, attention_mask = left_padded_batch(padding=6)
        cache = new_cache("dynamic", self.model.config)
        sequences, step_logits = prompt, []
        with torch.no_grad():
            positions = rope_cache_utils.positions_from_attention_mask(attention_mask)
            outputs = self.model(prompt, attention_mask=attention_mask, position_ids=positions, past_key_values=cache)
            for _ in range(12):
                step_logits.append(outputs.logits[:, -1])
                next_tokens = outputs.logits[:, -1].argmax(-1, keepdim=True)
                sequences = torch.cat([sequences, next_tokens], dim=-1)
                attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens)], dim=-1)
                positions = positions[:, -1:] + 1
                outputs = self.model(
                    next_tokens, attention_mask=attention_mask, position_ids=positions, past_key_values=cache
                )
        errors = row_alone_errors(self.model, sequences, step_logits, attention_mask, prompt.shape[1])
        self.assertMatchesNoCache(errors)

    def test_long_loop_with_explicit_positions_before_the_switch(self):
        # Over 64 single-token steps before the switch: the record merges its chunks, positions included.
        switch_point = 80
        model = tiny_phi3_model(switch_point=switch_point)
        input_ids = random_tokens(switch_point + 3)
        cache = new_cache("dynamic", model.config)
        errors = []
        with torch.no_grad():
            model(input_ids[:, :2], position_ids=torch.arange(2)[None], past_key_values=cache)
            for position in range(2, input_ids.shape[1]):
                outputs = model(
                    input_ids[:, position : position + 1],
                    position_ids=torch.tensor([[position]]),
                    past_key_values=cache,
                )
                if position >= switch_point - 1:
                    reference = no_cache_logits(model, input_ids[:, : position + 1])
                    errors.append((outputs.logits[:, -1] - reference).abs().max().item())
        self.assertMatchesNoCache(errors)

    def test_forward_without_cache_is_unchanged_and_unrecorded(self):
        input_ids = random_tokens(SWITCH_POINT + 8, batch_size=2)
        with torch.no_grad():
            patched = self.model(input_ids, position_ids=torch.arange(input_ids.shape[1])[None], use_cache=False)
            patches.revert()
            upstream = self.model(input_ids, position_ids=torch.arange(input_ids.shape[1])[None], use_cache=False)
        self.assertTrue(torch.equal(patched.logits, upstream.logits))
        self.assertIsNone(patched.past_key_values)

    def test_crossing_twice_in_one_cache_after_reset(self):
        # A cache reused for a second prompt after `reset()` starts a fresh record.
        cache = new_cache("static", self.model.config, 2 * SWITCH_POINT)
        for seed in (0, 1):
            cache.reset()
            errors, _ = hand_written_loop_errors(
                self.model, random_tokens(SWITCH_POINT + 4, seed=seed), SWITCH_POINT - 2, past_key_values=cache
            )
            self.assertMatchesNoCache(errors)


@require_torch
class Phi3StaleCachePolicyTest(unittest.TestCase):
    def setUp(self):
        self.model = tiny_phi3_model()
        self.input_ids = random_tokens(SWITCH_POINT + 4)

    def _prefill(self):
        cache = new_cache("dynamic", self.model.config)
        with torch.no_grad():
            self.model(self.input_ids[:, : SWITCH_POINT - 1], past_key_values=cache)
        return cache

    def _step(self, cache, position):
        with torch.no_grad():
            return self.model(self.input_ids[:, position : position + 1], past_key_values=cache)

    def test_warn_warns_once_and_keeps_the_stale_cache(self):
        with patches.applied(stale_cache="warn"):
            cache = self._prefill()
            self._step(cache, SWITCH_POINT - 1)
            with self.assertWarns(patches.StaleRopeCacheWarning) as caught:
                outputs = self._step(cache, SWITCH_POINT)
            self.assertIn(f"now {SWITCH_POINT + 1} tokens long", str(caught.warning))
            # It points at the caller's line, past the decorators and module calls
            self.assertEqual(caught.filename, __file__)
            self.assertIn('stale_cache="recompute"', str(caught.warning))
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("error", patches.StaleRopeCacheWarning)
                self._step(cache, SWITCH_POINT + 1)
        reference = no_cache_logits(self.model, self.input_ids[:, : SWITCH_POINT + 1])
        self.assertGreater((outputs.logits[:, -1] - reference).abs().max().item(), 100 * FP32_TOLERANCE)

    def test_raise_raises_before_touching_the_cache(self):
        with patches.applied(stale_cache="raise"):
            cache = self._prefill()
            self._step(cache, SWITCH_POINT - 1)
            keys_before = cached_keys_and_values(cache, 0)[0].clone()
            with self.assertRaisesRegex(patches.StaleRopeCacheError, "recompute"):
                self._step(cache, SWITCH_POINT)
        self.assertTrue(torch.equal(cached_keys_and_values(cache, 0)[0], keys_before))

    def test_raise_in_generate(self):
        with patches.applied(stale_cache="raise"), self.assertRaises(patches.StaleRopeCacheError):
            self.model.generate(random_tokens(SWITCH_POINT - 2), max_new_tokens=6, do_sample=False, pad_token_id=0)

    @parameterized.expand(
        [
            ("warn", "warn"),
            ("rerotate", "rerotate"),
            ("ignore_longrope_only", {"longrope": "ignore", "dynamic": "warn"}),
        ]
    )
    def test_no_policy_makes_generate_less_exact_than_upstream(self, _, policy):
        # Upstream's generate() drops Phi-3's cache at the switch: exact. Every policy but "raise" recomputes there.
        # "ignore" keeps no record of the forward passes, so a left-padded row crossing after the first is left as
        # upstream leaves it; the other policies recompute it too.
        prompt = random_tokens(SWITCH_POINT - 3)
        with patches.applied(stale_cache=policy), warnings.catch_warnings():
            warnings.simplefilter("error", patches.StaleRopeCacheWarning)
            _, errors = generate_errors(self.model, prompt, max_new_tokens=8, do_sample=False)
            row_errors = left_padded_generate_row_errors(self.model) if isinstance(policy, str) else [0.0]
        self.assertLessEqual(max(errors), FP32_TOLERANCE, errors)
        self.assertLessEqual(max(row_errors), FP32_TOLERANCE, row_errors)

    def test_ignore_keeps_the_stale_cache_silently(self):
        with patches.applied(stale_cache="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("error", patches.StaleRopeCacheWarning)
                errors, _ = hand_written_loop_errors(self.model, self.input_ids, SWITCH_POINT - 1)
        self.assertGreater(max(errors), 100 * FP32_TOLERANCE)

    def test_ignore_keeps_upstream_generate(self):
        prompt = random_tokens(SWITCH_POINT - 2)
        upstream_sequences, upstream_errors = generate_errors(self.model, prompt, max_new_tokens=6)
        original = type(self.model).prepare_inputs_for_generation
        with patches.applied(stale_cache="ignore"):
            self.assertIs(type(self.model).prepare_inputs_for_generation, original)
            sequences, errors = generate_errors(self.model, prompt, max_new_tokens=6)
        self.assertTrue(torch.equal(sequences, upstream_sequences))
        torch.testing.assert_close(errors, upstream_errors, rtol=0, atol=FP32_TOLERANCE)

    def test_recompute_refuses_a_cache_reordered_outside_the_model(self):
        # A reorder makes new tensors: the record no longer knows what the cache holds (a crop it recognises: see
        # tests/test_rollbacks.py)
        with patches.applied(stale_cache="recompute"):
            cache = self._prefill()
            self._step(cache, SWITCH_POINT - 1)
            cache.reorder_cache(torch.tensor([0]))
            with self.assertRaisesRegex(patches.StaleRopeCacheError, "cropped, reordered or filled outside"):
                self._step(cache, SWITCH_POINT)

    @parameterized.expand([("dynamic", "dynamic"), ("static", "static")])
    def test_rerotate_makes_the_first_layer_exact(self, _, cache_kind):
        # Rotating the cached keys to the long factors gives the first layer exactly the keys a fresh forward pass
        # computes; deeper layers were computed from hidden states that saw the short factors, and stay off.
        cache = new_cache(cache_kind, self.model.config)
        with patches.applied(stale_cache="rerotate"), torch.no_grad():
            self.model(self.input_ids[:, : SWITCH_POINT - 1], past_key_values=cache)
            for position in range(SWITCH_POINT - 1, SWITCH_POINT + 1):
                outputs = self._step(cache, position)
        length = SWITCH_POINT + 1
        with patches.applied(stale_cache="recompute"), torch.no_grad():
            fresh = new_cache("dynamic", self.model.config)
            self.model(self.input_ids[:, :length], past_key_values=fresh)
        first_keys, fresh_first_keys = (cached_keys_and_values(c, 0)[0][:, :, :length] for c in (cache, fresh))
        torch.testing.assert_close(first_keys, fresh_first_keys, rtol=1e-5, atol=1e-5)
        last_layer = self.model.config.num_hidden_layers - 1
        last_keys, fresh_last_keys = (cached_keys_and_values(c, last_layer)[0][:, :, :length] for c in (cache, fresh))
        self.assertGreater((last_keys - fresh_last_keys).abs().max().item(), 1e-3)
        reference = no_cache_logits(self.model, self.input_ids[:, :length])
        self.assertGreater((outputs.logits[:, -1] - reference).abs().max().item(), FP32_TOLERANCE)

    @parameterized.expand([("unknown_string", "sometimes"), ("unknown_in_dict", {"longrope": "maybe"})])
    def test_unknown_policy_is_a_value_error(self, _, policy):
        with self.assertRaisesRegex(ValueError, "recompute.*warn.*raise.*ignore"):
            patches.apply(stale_cache=policy)
        self.assertFalse(patches.status().applied)

    def test_unknown_rope_type_in_policy_is_a_value_error(self):
        with self.assertRaisesRegex(ValueError, "longrope"):
            patches.apply(stale_cache={"yarn": "recompute"})


@require_torch
class Phi3ReleaseCompositionTest(unittest.TestCase):
    """How the patch composes with what each release already does at the switch."""

    def setUp(self):
        self.model = tiny_phi3_model()
        self.input_ids = random_tokens(SWITCH_POINT + 4)

    def test_generate_recomputes_exactly_once_in_the_callers_cache(self):
        # From 4.45 upstream drops the cache at the switch itself; with the patch, only the patch recomputes, once,
        # in the cache object the caller passed.
        cache = new_cache("dynamic", self.model.config)
        with (
            patches.applied(),
            mock.patch.object(rope_cache_utils, "_reset_cache", wraps=rope_cache_utils._reset_cache) as reset,
        ):
            with torch.no_grad():
                outputs = self.model.generate(
                    random_tokens(SWITCH_POINT - 3),
                    past_key_values=cache,
                    max_new_tokens=8,
                    do_sample=False,
                    pad_token_id=0,
                    return_dict_in_generate=True,
                )
        self.assertEqual(reset.call_count, 1)
        self.assertIs(outputs.past_key_values, cache)

    @parameterized.expand([("recompute",), ("warn",)])
    def test_no_upstream_warning_at_the_switch(self, policy):
        # 4.45-4.47 warn at the switch from the causal LM's forward pass (reading the device at every step); the
        # patch replaces that warning by its policy, so there is at most one warning, the patch's.
        prompt_length = SWITCH_POINT - 2
        logger = logging.get_logger("transformers.models.phi3.modeling_phi3")
        with (
            patches.applied(stale_cache=policy),
            CaptureLogger(logger) as captured,
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always", patches.StaleRopeCacheWarning)
            cache = new_cache("dynamic", self.model.config)
            cache_position = torch.arange(prompt_length)
            with torch.no_grad():
                self.model(
                    self.input_ids[:, :prompt_length], past_key_values=cache, **self._cache_position(cache_position)
                )
                for position in range(prompt_length, self.input_ids.shape[1]):
                    self.model(
                        self.input_ids[:, position : position + 1],
                        past_key_values=cache,
                        **self._cache_position(torch.tensor([position])),
                    )
        self.assertNotIn("KV cache needs to be recomputed", captured.out)
        stale_warnings = [warning for warning in caught if issubclass(warning.category, patches.StaleRopeCacheWarning)]
        self.assertEqual(len(stale_warnings), 1 if policy == "warn" else 0)

    def _cache_position(self, cache_position):
        # The upstream warning reads `cache_position` when `use_cache` is set, as `generate()` passes them
        if "cache_position" in inspect.signature(self.model.forward).parameters:
            return {"cache_position": cache_position, "use_cache": True}
        return {"use_cache": True}

    @parameterized.expand([("recompute",), ("warn",), ("raise",), ("ignore",)])
    @unittest.skipUnless(ACCEPTS_LEGACY_CACHE, "this release's Phi-3 takes no legacy tuple caches")
    def test_legacy_tuple_cache_in_a_hand_written_loop(self, policy):
        prompt_length = SWITCH_POINT - 2
        errors, raised = [], False
        with patches.applied(stale_cache=policy), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", patches.StaleRopeCacheWarning)
            with torch.no_grad():
                cache = self.model(self.input_ids[:, :prompt_length], use_cache=True).past_key_values
                self.assertIsInstance(cache, tuple)
                try:
                    for position in range(prompt_length, self.input_ids.shape[1]):
                        outputs = self.model(self.input_ids[:, position : position + 1], past_key_values=cache)
                        self.assertIsInstance(outputs.past_key_values, tuple)
                        cache = outputs.past_key_values
                        reference = no_cache_logits(self.model, self.input_ids[:, : position + 1])
                        errors.append((outputs.logits[:, -1] - reference).abs().max().item())
                except patches.StaleRopeCacheError:
                    raised = True
        stale_warnings = [warning for warning in caught if issubclass(warning.category, patches.StaleRopeCacheWarning)]
        steps_before_switch = SWITCH_POINT - prompt_length
        self.assertLessEqual(max(errors[:steps_before_switch]), FP32_TOLERANCE)
        if policy == "recompute":
            self.assertLessEqual(max(errors), FP32_TOLERANCE, errors)
        elif policy == "raise":
            self.assertTrue(raised)
            self.assertEqual(len(errors), steps_before_switch)
        else:
            self.assertGreater(max(errors), 100 * FP32_TOLERANCE)
        self.assertEqual(len(stale_warnings), 1 if policy == "warn" else 0)


@require_torch
class Phi3UntouchedModelsTest(unittest.TestCase):
    def test_default_rope_outputs_are_bitwise_unchanged(self):
        model = tiny_phi3_model(rope_type="default")
        input_ids = random_tokens(SWITCH_POINT + 6)

        unpatched = cached_decoding_logits(model, input_ids, SWITCH_POINT - 2)
        with patches.applied():
            patched = cached_decoding_logits(model, input_ids, SWITCH_POINT - 2)
        for before, after in zip(unpatched, patched):
            self.assertTrue(torch.equal(before, after))

    @parameterized.expand([("eager",), ("inductor",)])
    @unittest.skipUnless(
        SUPPORTS_STATIC_CACHE_GENERATION, "this release's Phi-3 has no compilable static-cache decode step"
    )
    def test_compiled_decode_steps_across_the_switch_match_no_cache(self, backend):
        # `eager` checks that the patched step traces as one graph; `inductor` also runs the generated kernels
        if backend == "inductor" and shutil.which("g++") is None and shutil.which("c++") is None:
            self.skipTest("inductor on CPU needs a C++ compiler (g++ or c++), and none is on PATH")
        model = tiny_phi3_model()
        input_ids = random_tokens(SWITCH_POINT + 6)
        with patches.applied():
            errors = compiled_decode_step_errors(
                model, input_ids, SWITCH_POINT - 4, max_cache_len=2 * SWITCH_POINT, backend=backend
            )
        self.assertEqual(sorted(errors), list(range(SWITCH_POINT - 3, SWITCH_POINT + 7)))
        self.assertLessEqual(max(errors.values()), FP32_TOLERANCE, f"max |Δlogit| per sequence length: {errors}")

    @unittest.skipUnless(
        SUPPORTS_STATIC_CACHE_GENERATION, "this release's Phi-3 has no compilable static-cache decode step"
    )
    def test_eager_step_after_compiled_steps_refuses_to_recompute_an_unrecorded_cache(self):
        # Compiled steps leave the cache unrecorded: the eager step that crosses the switch says so, rather than
        # recomputing from inputs it does not have
        model = tiny_phi3_model()
        input_ids = random_tokens(SWITCH_POINT + 1)
        cache = new_cache("static", model.config, 2 * SWITCH_POINT)
        takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters

        def positions(start: int, end: int) -> dict:
            return {"cache_position": torch.arange(start, end)} if takes_cache_position else {}

        with patches.applied(), torch.no_grad():
            model(input_ids[:, : SWITCH_POINT - 1], past_key_values=cache, **positions(0, SWITCH_POINT - 1))
            compiled_step = torch.compile(model.forward, fullgraph=True, backend="eager")
            compiled_step(
                input_ids[:, SWITCH_POINT - 1 : SWITCH_POINT],
                past_key_values=cache,
                **positions(SWITCH_POINT - 1, SWITCH_POINT),
            )
            with self.assertRaisesRegex(patches.StaleRopeCacheError, "cannot be recomputed"):
                model(input_ids[:, SWITCH_POINT:], past_key_values=cache, **positions(SWITCH_POINT, SWITCH_POINT + 1))


@require_torch
@unittest.skipUnless(CONSISTENT_DECODING_AVAILABLE, "consistent decoding needs transformers 4.48 or later")
class Phi3ConsistentDecodingTest(unittest.TestCase):
    """
    `consistent=True` with the default `stale_cache="recompute"`: across the longrope switch every decode step's
    logits are bitwise those of the forward pass without cache over the same tokens, the recomputed prefix included.
    """

    @parameterized.expand([(dtype, attention) for dtype in DTYPES for attention in ("eager", "sdpa")])
    def test_decode_steps_across_the_switch_are_bitwise_equal_to_no_cache(self, dtype_name, attention):
        model = tiny_phi3_model(attn_implementation=attention).to(DTYPES[dtype_name])
        with patches.applied(consistent=True):
            mismatches = bitwise_mismatches(model, random_tokens(SWITCH_POINT + 40), prompt_length=SWITCH_POINT - 5)
        self.assertEqual(mismatches, [])

    @parameterized.expand([("static",), ("left_padded",)])
    def test_across_the_switch_with_static_cache_or_left_padding(self, case):
        model = tiny_phi3_model(attn_implementation="sdpa")
        length = SWITCH_POINT + 30
        batch_size = 3 if case == "left_padded" else 1
        attention_mask = left_padding_mask(batch_size, length)
        cache = new_cache("static", model.config) if case == "static" else None
        with patches.applied(consistent=True):
            mismatches = bitwise_mismatches(
                model,
                random_tokens(length, batch_size=batch_size),
                prompt_length=SWITCH_POINT - 5,
                attention_mask=attention_mask,
                past_key_values=cache,
            )
        self.assertEqual(mismatches, [])

    def test_greedy_generation_across_the_switch_with_cache_equals_without(self):
        model = tiny_phi3_model(attn_implementation="sdpa").to(torch.bfloat16)
        with patches.applied(consistent=True):
            cached, uncached = greedy_with_and_without_cache(
                model, random_tokens(SWITCH_POINT - 10), max_new_tokens=100
            )
        self.assertTrue(torch.equal(cached.sequences, uncached.sequences))
        self.assertTrue(all(torch.equal(a, b) for a, b in zip(cached.logits, uncached.logits)))


def assert_switch_error_within_noise(test_case, patched_errors: dict, stale_errors: dict, switch_point: int):
    """
    `patched_errors` and `stale_errors` map sequence lengths to the max |Δlogit| of decode steps against no cache:
    after the switch, the patched steps stay within `BF16_NOISE_MARGIN` times the drift measured before it, and the
    stale cache exceeds that, so the check can fail.
    """
    noise = max(error for length, error in patched_errors.items() if length <= switch_point)
    patched_after = max(error for length, error in patched_errors.items() if length > switch_point)
    stale_after = max(error for length, error in stale_errors.items() if length > switch_point)
    details = f"drift before the switch {noise:.3g}, patched after {patched_after:.3g}, stale after {stale_after:.3g}"
    test_case.assertLessEqual(patched_after, BF16_NOISE_MARGIN * noise, details)
    test_case.assertGreater(stale_after, BF16_NOISE_MARGIN * noise, details)


@slow
@require_torch_accelerator
class Phi3RealSizeIntegrationTest(unittest.TestCase):
    """
    Phi-3-mini-128k's shape (32 layers, hidden size 3072, switch at 4096) with random weights in bf16 on an
    accelerator: a prompt of 4088 tokens decoded across the switch.
    """

    prompt_length = PHI3_MINI_SWITCH_POINT - 8
    total_length = PHI3_MINI_SWITCH_POINT + 8

    @classmethod
    def setUpClass(cls):
        cls.model = real_size_phi3_model(torch_device)
        cls.input_ids = random_tokens(cls.total_length, vocab_size=cls.model.config.vocab_size).to(torch_device)

    @classmethod
    def tearDownClass(cls):
        del cls.model
        backend_empty_cache(torch_device)

    def test_decode_steps_across_the_switch_match_no_cache_within_bf16_drift(self):
        with patches.applied():
            patched_errors = decode_step_errors(self.model, self.input_ids, self.prompt_length)
        stale_errors = decode_step_errors(self.model, self.input_ids, self.prompt_length)
        assert_switch_error_within_noise(self, patched_errors, stale_errors, PHI3_MINI_SWITCH_POINT)

    def test_generate_across_the_switch_matches_no_cache_within_bf16_drift(self):
        prompt = self.input_ids[:, : self.prompt_length]
        with patches.applied():
            sequences, errors = generate_errors(self.model, prompt, max_new_tokens=16, do_sample=False)
            # The same tokens through a hand-written loop give the drift before the switch to compare with
            step_errors = decode_step_errors(self.model, sequences[:, :-1], self.prompt_length)
        noise = max(error for length, error in step_errors.items() if length <= PHI3_MINI_SWITCH_POINT)
        self.assertLessEqual(max(errors), BF16_NOISE_MARGIN * noise, f"drift {noise:.3g}, generate() {errors}")

    @unittest.skipUnless(CONSISTENT_DECODING_AVAILABLE, "consistent decoding needs transformers 4.48 or later")
    def test_consistent_mode_is_bitwise_equal_to_no_cache_across_the_switch(self):
        with patches.applied(consistent=True):
            mismatches = bitwise_mismatches(
                self.model, self.input_ids[:, : PHI3_MINI_SWITCH_POINT + 4], prompt_length=self.prompt_length
            )
        self.assertEqual(mismatches, [])

    @unittest.skipUnless(SUPPORTS_STATIC_CACHE_GENERATION, "this release's Phi-3 has no static-cache decode step")
    def test_compiled_decode_steps_across_the_switch(self):
        # Four layers of the real width: compiling all 32 adds minutes and nothing the check needs
        model = real_size_phi3_model(torch_device, num_hidden_layers=4)
        errors = compiled_decode_step_errors(
            model, self.input_ids, self.prompt_length, max_cache_len=self.total_length, backend="inductor"
        )
        noise = max(error for length, error in errors.items() if length <= PHI3_MINI_SWITCH_POINT)
        after = max(error for length, error in errors.items() if length > PHI3_MINI_SWITCH_POINT)
        self.assertLessEqual(after, BF16_NOISE_MARGIN * noise, f"per step: {errors}")
        # `generate()` with a static cache compiles its decode steps on accelerators, and runs the switch eagerly
        with patches.applied():
            _, generate_step_errors = generate_errors(
                model,
                self.input_ids[:, : self.prompt_length],
                max_new_tokens=16,
                do_sample=False,
                cache_implementation="static",
            )
        self.assertLessEqual(max(generate_step_errors), BF16_NOISE_MARGIN * noise, f"per step: {generate_step_errors}")


CHECKPOINT_NAMES = [("phi3-mini-128k",), ("phi3.5-mini",), ("phi4-mini",)]


@slow
@require_torch_accelerator
class Phi3CheckpointIntegrationTest(unittest.TestCase):
    """
    Long-context Phi-3 family checkpoints, when present locally (see `tests/real_size_utils.CHECKPOINTS` for the
    environment variables and hub ids; nothing is downloaded), in bf16 on an accelerator, decoded across the switch.
    """

    def load(self, name: str):
        path, reason = local_checkpoint(name)
        if path is None:
            self.skipTest(reason)
        model, tokenizer = load_checkpoint(path, torch_device)
        self.addCleanup(backend_empty_cache, torch_device)
        return model, tokenizer

    @parameterized.expand(CHECKPOINT_NAMES)
    def test_decode_steps_across_the_switch_match_no_cache_within_bf16_drift(self, name):
        model, tokenizer = self.load(name)
        switch_point = model.config.original_max_position_embeddings
        input_ids = long_text_ids(tokenizer, switch_point + 8, torch_device)
        with patches.applied():
            patched_errors = decode_step_errors(model, input_ids, switch_point - 8)
        stale_errors = decode_step_errors(model, input_ids, switch_point - 8)
        assert_switch_error_within_noise(self, patched_errors, stale_errors, switch_point)

    @parameterized.expand(CHECKPOINT_NAMES)
    def test_greedy_text_across_the_switch_is_the_same_with_and_without_cache(self, name):
        model, tokenizer = self.load(name)
        switch_point = model.config.original_max_position_embeddings
        prompt = long_text_ids(tokenizer, switch_point - 6, torch_device)
        modes = [False, True] if CONSISTENT_DECODING_AVAILABLE else [False]
        for consistent in modes:
            with self.subTest(consistent=consistent), patches.applied(consistent=consistent):
                cached, uncached = greedy_with_and_without_cache(model, prompt, max_new_tokens=16)
                self.assertEqual(
                    tokenizer.decode(cached.sequences[0, prompt.shape[1] :]),
                    tokenizer.decode(uncached.sequences[0, prompt.shape[1] :]),
                )
