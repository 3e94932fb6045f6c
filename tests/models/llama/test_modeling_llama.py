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
"""Testing Llama with sequence-dependent RoPE (longrope, dynamic NTK): frequency updates and the KV cache."""

import unittest
import warnings

import torch
from packaging.version import Version
from parameterized import parameterized

import patches
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.testing_utils import (
    backend_empty_cache,
    require_torch,
    require_torch_accelerator,
    slow,
    torch_device,
)

from ...cache_consistency_utils import (
    CONSISTENT_DECODING_AVAILABLE,
    DTYPES,
    FP32_TOLERANCE,
    REPORTS_SPECULATIVE_LOGITS_PER_TOKEN,
    SWITCH_POINT,
    TRANSFORMERS_VERSION,
    bitwise_mismatches,
    cached_decoding_logits,
    generate_errors,
    greedy_with_and_without_cache,
    hand_written_loop_errors,
    left_padded_generate_row_errors,
    left_padding_mask,
    new_cache,
    random_tokens,
    reset_dynamic_rope,
    tiny_llama_model,
)
from ...real_size_utils import (
    first_token_divergence,
    load_checkpoint,
    local_checkpoint,
    long_text_ids,
    real_size_llama_model,
)


UPSTREAM_SWITCHES_LLAMA_LONGROPE = Version("4.51") <= TRANSFORMERS_VERSION
"""Before 4.51, Llama's rotary embedding has no longrope update: it keeps its initial factors at every length."""

LONGROPE_INIT_HAS_SHORT_FACTORS = Version("4.45") <= TRANSFORMERS_VERSION
"""4.44's longrope init gives every model but Phi-3 the long factors whatever the length: there is no switch (and no
stale cache) to fix, and the patch does not invent one."""


def rotary_embedding(model):
    return model.model.rotary_emb


def expected_inv_freq(model, rope_type: str, sequence_length: int) -> torch.Tensor:
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](model.config, "cpu", seq_len=sequence_length)
    return inv_freq


def stale_cache_warnings(caught) -> list:
    return [warning for warning in caught if issubclass(warning.category, patches.StaleRopeCacheWarning)]


@require_torch
class LlamaLongRopeTest(unittest.TestCase):
    def setUp(self):
        self.model = tiny_llama_model("longrope")

    def assertMatchesNoCache(self, errors):
        self.assertGreater(len(errors), 0)
        self.assertLessEqual(max(errors), FP32_TOLERANCE, f"max |Δlogit| per step: {errors}")

    @unittest.skipUnless(LONGROPE_INIT_HAS_SHORT_FACTORS, "this release's longrope init has only the long factors")
    def test_short_factors_up_to_the_switch_and_long_factors_beyond(self):
        with patches.applied(), torch.no_grad():
            for length, uses_long in ((SWITCH_POINT, False), (SWITCH_POINT + 1, True)):
                self.model(random_tokens(length), use_cache=False)
                # The short set is asked for with a length of 1: before 4.48 the init function gives the long set
                # for a sequence of exactly `original_max_position_embeddings` tokens
                expected = expected_inv_freq(self.model, "longrope", SWITCH_POINT + 1 if uses_long else 1)
                torch.testing.assert_close(rotary_embedding(self.model).inv_freq, expected)

    @parameterized.expand(
        [("dynamic_one_token", "dynamic", 1), ("static_one_token", "static", 1), ("dynamic_chunks", "dynamic", 3)]
    )
    def test_hand_written_loop_matches_no_cache(self, _, cache_kind, chunk_size):
        input_ids = random_tokens(SWITCH_POINT + 8)
        with patches.applied():
            errors, _ = hand_written_loop_errors(
                self.model,
                input_ids,
                SWITCH_POINT - 4,
                past_key_values=new_cache(cache_kind, self.model.config),
                chunk_size=chunk_size,
            )
        self.assertMatchesNoCache(errors)

    @parameterized.expand([("greedy", {}), ("prompt_lookup", {"prompt_lookup_num_tokens": 4})])
    def test_generate_matches_no_cache(self, _, generate_kwargs):
        half = random_tokens(SWITCH_POINT // 2 - 2)
        prompt = torch.cat([half, half], dim=-1)
        with patches.applied():
            sequences, errors = generate_errors(
                self.model, prompt, max_new_tokens=10, do_sample=False, **generate_kwargs
            )
            with torch.no_grad():
                greedy = self.model.generate(
                    prompt, max_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=0
                )
        self.assertTrue(torch.equal(sequences, greedy))
        if "prompt_lookup_num_tokens" not in generate_kwargs or REPORTS_SPECULATIVE_LOGITS_PER_TOKEN:
            self.assertMatchesNoCache(errors)

    def test_each_row_of_a_left_padded_batch_matches_that_row_alone(self):
        with patches.applied():
            errors = left_padded_generate_row_errors(self.model)
        self.assertMatchesNoCache(errors)

    def test_upstream(self):
        # What the patch fixes: from 4.51 upstream switches the factors but keeps the stale cache; before, it never
        # switches at all (every length gets the short factors).
        with torch.no_grad():
            errors, _ = hand_written_loop_errors(self.model, random_tokens(SWITCH_POINT + 4), SWITCH_POINT - 2)
            frequencies = []
            for length in (SWITCH_POINT - 4, SWITCH_POINT + 4):
                self.model(random_tokens(length), use_cache=False)
                frequencies.append(rotary_embedding(self.model).inv_freq.clone())
        if UPSTREAM_SWITCHES_LLAMA_LONGROPE:
            self.assertGreater(max(errors), 100 * FP32_TOLERANCE)
            self.assertFalse(torch.equal(*frequencies))
        else:
            self.assertTrue(torch.equal(*frequencies))


@require_torch
class LlamaDynamicNtkTest(unittest.TestCase):
    def setUp(self):
        self.model = tiny_llama_model("dynamic")
        self.input_ids = random_tokens(SWITCH_POINT + 6)

    def test_dynamic_update_grows_and_resets(self):
        rotary = rotary_embedding(self.model)
        original = rotary.original_inv_freq.clone()
        with patches.applied(), torch.no_grad():
            self.model(random_tokens(SWITCH_POINT), use_cache=False)
            torch.testing.assert_close(rotary.inv_freq, original)
            self.model(random_tokens(SWITCH_POINT + 8), use_cache=False)  # growth
            torch.testing.assert_close(rotary.inv_freq, expected_inv_freq(self.model, "dynamic", SWITCH_POINT + 8))
            self.assertEqual(int(rotary.max_seq_len_cached), SWITCH_POINT + 8)
            # Shorter, still scaled: scaled for its own length, as a fresh model would (upstream keeps the longest)
            self.model(random_tokens(SWITCH_POINT + 4), use_cache=False)
            torch.testing.assert_close(rotary.inv_freq, expected_inv_freq(self.model, "dynamic", SWITCH_POINT + 4))
            self.assertEqual(int(rotary.max_seq_len_cached), SWITCH_POINT + 4)
            self.model(random_tokens(SWITCH_POINT - 4), use_cache=False)  # back in the original range: reset
            torch.testing.assert_close(rotary.inv_freq, original)
            self.assertEqual(int(rotary.max_seq_len_cached), SWITCH_POINT)

    def test_default_policy_warns_once_and_keeps_the_cache(self):
        with patches.applied() as status, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", patches.StaleRopeCacheWarning)
            errors, _ = hand_written_loop_errors(self.model, self.input_ids, SWITCH_POINT - 2)
        self.assertEqual(status.stale_cache["dynamic"], "warn")
        self.assertEqual(len(stale_cache_warnings(caught)), 1)
        self.assertIn("scaled for", str(stale_cache_warnings(caught)[0].message))
        self.assertLessEqual(max(errors[:2]), FP32_TOLERANCE)
        self.assertGreater(max(errors), 10 * FP32_TOLERANCE)

    def test_recompute_is_exact_in_loops_and_generate(self):
        with patches.applied(stale_cache={"dynamic": "recompute"}):
            errors, _ = hand_written_loop_errors(self.model, self.input_ids, SWITCH_POINT - 2)
            reset_dynamic_rope(self.model)
            _, generate_step_errors = generate_errors(
                self.model, random_tokens(SWITCH_POINT - 2), max_new_tokens=8, do_sample=False
            )
        self.assertLessEqual(max(errors), FP32_TOLERANCE, errors)
        self.assertLessEqual(max(generate_step_errors), FP32_TOLERANCE, generate_step_errors)

    def test_raise(self):
        with patches.applied(stale_cache={"dynamic": "raise"}), self.assertRaises(patches.StaleRopeCacheError):
            hand_written_loop_errors(self.model, self.input_ids, SWITCH_POINT - 2)

    def test_policies_are_chosen_per_rope_type(self):
        longrope_model = tiny_llama_model("longrope")
        policy = {"dynamic": "recompute", "longrope": "warn"}
        with patches.applied(stale_cache=policy) as status, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", patches.StaleRopeCacheWarning)
            dynamic_errors, _ = hand_written_loop_errors(self.model, self.input_ids, SWITCH_POINT - 2)
            self.assertEqual(stale_cache_warnings(caught), [])
            longrope_errors, _ = hand_written_loop_errors(longrope_model, self.input_ids, SWITCH_POINT - 2)
        self.assertEqual(status.stale_cache, policy)
        self.assertLessEqual(max(dynamic_errors), FP32_TOLERANCE)
        if LONGROPE_INIT_HAS_SHORT_FACTORS:
            self.assertEqual(len(stale_cache_warnings(caught)), 1)
            self.assertGreater(max(longrope_errors), 100 * FP32_TOLERANCE)


@require_torch
class LlamaUntouchedTest(unittest.TestCase):
    def test_default_rope_outputs_are_bitwise_unchanged(self):
        model = tiny_llama_model("default")
        input_ids = random_tokens(SWITCH_POINT + 6)

        unpatched = cached_decoding_logits(model, input_ids, SWITCH_POINT - 2)
        with patches.applied():
            patched = cached_decoding_logits(model, input_ids, SWITCH_POINT - 2)
        for before, after in zip(unpatched, patched):
            self.assertTrue(torch.equal(before, after))


ATTENTION_REQUESTS = ("eager", "sdpa")
CONSISTENT_CASES = [(dtype, attention) for dtype in DTYPES for attention in ATTENTION_REQUESTS]


@require_torch
@unittest.skipUnless(CONSISTENT_DECODING_AVAILABLE, "consistent decoding needs transformers 4.48 or later")
class LlamaConsistentDecodingTest(unittest.TestCase):
    """
    `patches.apply(consistent=True)`: every decode step's logits are bitwise those of the forward pass without cache
    over the same tokens (`torch.equal`), for each dtype and attention request. Prompts of 37 and 5 tokens are no
    multiple of the query tiles (4) or key blocks (64); the sequences cross several tile and block boundaries.
    """

    def model(self, dtype_name: str, attention: str):
        return tiny_llama_model("default", attn_implementation=attention).to(DTYPES[dtype_name])

    def test_decode_steps_differ_in_normal_mode(self):
        # What consistent mode removes: fp32 rounding noise between the two computations (~1e-6, within tolerance)
        model = self.model("fp32", "eager")
        with patches.applied():
            mismatches = bitwise_mismatches(model, random_tokens(90), prompt_length=37)
        self.assertGreater(len(mismatches), 0)

    @parameterized.expand(CONSISTENT_CASES)
    def test_decode_steps_are_bitwise_equal_to_no_cache(self, dtype_name, attention):
        model = self.model(dtype_name, attention)
        with patches.applied(consistent=True):
            for prompt_length in (37, 5):
                self.assertEqual(bitwise_mismatches(model, random_tokens(110), prompt_length), [])

    @parameterized.expand(
        [(dtype, attention, batch_size) for dtype, attention in CONSISTENT_CASES for batch_size in (2, 3, 4)]
    )
    def test_left_padded_batches_are_bitwise_equal_to_no_cache(self, dtype_name, attention, batch_size):
        model = self.model(dtype_name, attention)
        input_ids = random_tokens(80, batch_size=batch_size)
        with patches.applied(consistent=True):
            mismatches = bitwise_mismatches(
                model, input_ids, prompt_length=37, attention_mask=left_padding_mask(batch_size, 80)
            )
        self.assertEqual(mismatches, [])

    @parameterized.expand(CONSISTENT_CASES)
    def test_greedy_generation_with_cache_equals_without(self, dtype_name, attention):
        model = self.model(dtype_name, attention)
        with patches.applied(consistent=True):
            cached, uncached = greedy_with_and_without_cache(model, random_tokens(21), max_new_tokens=110)
        self.assertTrue(torch.equal(cached.sequences, uncached.sequences))
        for step, (cached_logits, uncached_logits) in enumerate(zip(cached.logits, uncached.logits)):
            self.assertTrue(torch.equal(cached_logits, uncached_logits), f"step {step}")

    def test_left_padded_greedy_generation_with_cache_equals_without(self):
        model = self.model("bf16", "sdpa")
        attention_mask = left_padding_mask(4, 25)
        with patches.applied(consistent=True):
            cached, uncached = greedy_with_and_without_cache(
                model, random_tokens(25, batch_size=4), max_new_tokens=100, attention_mask=attention_mask
            )
        self.assertTrue(torch.equal(cached.sequences, uncached.sequences))
        self.assertTrue(all(torch.equal(a, b) for a, b in zip(cached.logits, uncached.logits)))

    def test_normal_mode_is_untouched(self):
        linear_forward = torch.nn.Linear.forward
        with patches.applied() as status:
            self.assertFalse(status.consistent)
            self.assertIs(torch.nn.Linear.forward, linear_forward)
        with patches.applied(consistent=True) as status:
            self.assertTrue(status.consistent)
            self.assertIsNot(torch.nn.Linear.forward, linear_forward)
            # Switching back to normal mode restores the very same functions
            patches.apply()
            self.assertIs(torch.nn.Linear.forward, linear_forward)
        self.assertIs(torch.nn.Linear.forward, linear_forward)


@require_torch
@unittest.skipIf(CONSISTENT_DECODING_AVAILABLE, "this release supports consistent decoding (tested above)")
class LlamaConsistentDecodingUnavailableTest(unittest.TestCase):
    def test_refuses_and_changes_nothing(self):
        linear_forward = torch.nn.Linear.forward
        with self.assertRaisesRegex(patches.ConsistentDecodingUnavailableError, "needs transformers>=4.48"):
            patches.apply(consistent=True)
        self.assertIs(torch.nn.Linear.forward, linear_forward)
        self.assertFalse(patches.status().applied)


@slow
@require_torch_accelerator
class LlamaRealSizeDivergenceTest(unittest.TestCase):
    """
    The first background thread's table on a model of Llama-2-7B's shape (random weights, sdpa): how far a cached
    decode step drifts from the forward pass without cache, layer by layer, in fp32, fp16 and bf16.
    """

    def test_divergence_grows_with_depth_and_with_coarser_dtypes(self):
        model = real_size_llama_model(torch_device, dtype=torch.float32)
        self.addCleanup(backend_empty_cache, torch_device)
        prompts = [random_tokens(256, vocab_size=model.config.vocab_size, seed=seed) for seed in range(2)]
        table = {}
        # fp32 first, then the weights cast down: every dtype has the same model
        for dtype_name in ("fp32", "fp16", "bf16"):
            model.to(DTYPES[dtype_name])
            per_prompt = [first_token_divergence(model, prompt) for prompt in prompts]
            table[dtype_name] = [sum(errors) / len(errors) for errors in zip(*per_prompt)]
        report = {name: [f"{error:.2g}" for error in errors] for name, errors in table.items()}
        for dtype_name, errors in table.items():
            hidden_states = errors[1:-1]  # index 0 is the embeddings, which a cache cannot change
            early, late = hidden_states[:8], hidden_states[-8:]
            with self.subTest(dtype=dtype_name):
                self.assertGreater(sum(late) / len(late), sum(early) / len(early), f"per layer: {report}")
        logits = {name: errors[-1] for name, errors in table.items()}
        self.assertGreater(logits["bf16"], logits["fp16"], f"per layer: {report}")
        self.assertGreater(logits["fp16"], logits["fp32"], f"per layer: {report}")


@slow
@require_torch_accelerator
class LlamaCheckpointIntegrationTest(unittest.TestCase):
    """
    A Llama checkpoint, when present locally (`LLAMA_CHECKPOINT_PATH`, or the hub id of
    `tests/real_size_utils.CHECKPOINTS` in the local hub cache; nothing is downloaded), in bf16 on an accelerator.
    """

    def setUp(self):
        path, reason = local_checkpoint("llama")
        if path is None:
            self.skipTest(reason)
        self.model, self.tokenizer = load_checkpoint(path, torch_device)
        self.addCleanup(backend_empty_cache, torch_device)

    @unittest.skipUnless(CONSISTENT_DECODING_AVAILABLE, "consistent decoding needs transformers 4.48 or later")
    def test_consistent_decode_steps_are_bitwise_equal_to_no_cache(self):
        input_ids = long_text_ids(self.tokenizer, 520, torch_device)
        with patches.applied(consistent=True):
            mismatches = bitwise_mismatches(self.model, input_ids, prompt_length=500)
        self.assertEqual(mismatches, [])

    def test_greedy_text_is_the_same_with_and_without_cache(self):
        prompt = long_text_ids(self.tokenizer, 500, torch_device)
        modes = [False, True] if CONSISTENT_DECODING_AVAILABLE else [False]
        for consistent in modes:
            with self.subTest(consistent=consistent), patches.applied(consistent=consistent):
                cached, uncached = greedy_with_and_without_cache(self.model, prompt, max_new_tokens=32)
                self.assertEqual(
                    self.tokenizer.decode(cached.sequences[0, prompt.shape[1] :]),
                    self.tokenizer.decode(uncached.sequences[0, prompt.shape[1] :]),
                )
