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
Continuous batching (`generate_batch`, the manager API) with RoPE frequencies that depend on the sequence length:
each request's tokens and log-probabilities against that request decoded alone without cache (`greedy_alone`), for
requests that cross the longrope switch, stay short, start long, and mixes of them; chunked prefill, prefix sharing,
eager and sdpa (their paged variants), dynamic NTK. Without the patches the same batches differ, so the tests can fail.
"""

import importlib.util
import time
import unittest
import warnings

from parameterized import parameterized

import patches
from patches.coverage import CONTINUOUS_BATCHING_FROM, protects_continuous_batching
from patches.reference import continuous_batching_errors, greedy_alone
from patches.tiny_models import SWITCH_POINT, random_tokens, tiny_phi3_model, tiny_standard_model

from .cache_consistency_utils import TRANSFORMERS_VERSION, QuietTestCase


SUPPORTED = protects_continuous_batching(str(TRANSFORMERS_VERSION))
SKIP_REASON = (
    f"the patches protect continuous batching from transformers {CONTINUOUS_BATCHING_FROM} (see test_warns_...)"
)
LOGPROB_TOLERANCE = 1e-4
NEW_TOKENS = 8
SETTINGS = {"num_blocks": 48, "max_batch_tokens": 64, "page_size": 16}

CROSSING = (SWITCH_POINT - 4, SWITCH_POINT - 2)  # prompts that cross the switch while decoding
SHORT = (5, 10)  # prompts that stay below it
LONG = (SWITCH_POINT + 8,)  # prompts past it from the start


def prompts(*lengths: int) -> list[list[int]]:
    return [random_tokens(length, seed=index)[0].tolist() for index, length in enumerate(lengths)]


def shared_prefix_prompts() -> list[list[int]]:
    """Prompts that share their first 20 tokens: one crosses, one stays short, one starts past the switch."""
    prefix = random_tokens(20, seed=7)[0].tolist()
    return [prefix + random_tokens(length, seed=8 + length)[0].tolist() for length in (6, 2, 20)]


def collect_results(manager, request_ids: list[str], results: dict, timeout: float = 60.0) -> dict[str, list[int]]:
    """Adds to `results` the generated tokens of `request_ids` (and of any other request delivered meanwhile), as the
    manager delivers them, in any order."""
    deadline = time.monotonic() + timeout
    while set(request_ids) - set(results) and time.monotonic() < deadline:
        result = manager.get_result(timeout=1)
        if result is not None:
            results[result.request_id] = result.generated_tokens
    missing = set(request_ids) - set(results)
    if missing:
        raise TimeoutError(f"no result for {sorted(missing)} after {timeout} s")
    return results


class ContinuousBatchingTestCase(QuietTestCase):
    def assertEveryRequestAsAlone(self, results):
        for index, (same_tokens, error) in enumerate(results):
            self.assertTrue(same_tokens, f"request {index}: its tokens differ from decoding it alone ({results})")
            self.assertLessEqual(error, LOGPROB_TOLERANCE, f"request {index}: |Δ log-probability| {error}")


@unittest.skipUnless(SUPPORTED, SKIP_REASON)
class ContinuousBatchingTest(ContinuousBatchingTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.enterClassContext(patches.applied())

    @parameterized.expand(
        [
            (attention, name, lengths)
            for attention in ("sdpa", "eager")
            for name, lengths in (
                ("crossing", CROSSING),
                ("short", SHORT),
                ("long", LONG),
                ("mixed", CROSSING + SHORT + LONG),
            )
        ]
    )
    def test_each_request_decodes_as_alone(self, attention, _, lengths):
        model = tiny_phi3_model(attn_implementation=attention)
        self.assertEveryRequestAsAlone(continuous_batching_errors(model, prompts(*lengths), NEW_TOKENS, **SETTINGS))

    def test_chunked_prefill_rotates_a_long_prompt_as_one_piece(self):
        # A 40-token prompt prefilled 24 tokens at a time: its first chunk ends before the switch
        model = tiny_phi3_model(attn_implementation="sdpa")
        settings = {**SETTINGS, "max_batch_tokens": 24}
        self.assertEveryRequestAsAlone(
            continuous_batching_errors(model, prompts(*CROSSING, *LONG), NEW_TOKENS, **settings)
        )

    def test_prefix_sharing_keeps_blocks_of_one_regime(self):
        model = tiny_phi3_model(attn_implementation="sdpa")
        results = continuous_batching_errors(
            model, shared_prefix_prompts(), NEW_TOKENS, allow_block_sharing=True, **SETTINGS
        )
        self.assertEveryRequestAsAlone(results)

    def test_dynamic_ntk_per_request_under_recompute(self):
        model = tiny_standard_model("llama", "dynamic", attn_implementation="sdpa")
        with patches.applied(stale_cache={"dynamic": "recompute"}):
            results = continuous_batching_errors(model, prompts(*CROSSING, *SHORT, *LONG), NEW_TOKENS, **SETTINGS)
        self.assertEveryRequestAsAlone(results)

    def test_dynamic_ntk_warns_under_its_default_policy(self):
        model = tiny_standard_model("llama", "dynamic", attn_implementation="sdpa")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            continuous_batching_errors(model, prompts(*CROSSING), NEW_TOKENS, **SETTINGS)
        messages = [str(warning.message) for warning in caught if warning.category is patches.StaleRopeCacheWarning]
        self.assertTrue(any("cached tokens were computed with the RoPE frequencies" in text for text in messages))

    def test_requests_added_while_others_run(self):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        model = tiny_phi3_model(attn_implementation="sdpa")
        generation_config = GenerationConfig(
            do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=-1, pad_token_id=0
        )
        config = ContinuousBatchingConfig(auto_switch_to_flash=False, use_async_batching=False, **SETTINGS)
        first, later = prompts(*CROSSING), prompts(*SHORT, *LONG)
        manager = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=config
        )
        manager.start()
        try:
            first_ids = [manager.add_request(prompt) for prompt in first]
            results = collect_results(manager, first_ids[:1], {})  # one done: the other is running or done
            later_ids = [manager.add_request(prompt) for prompt in later]
            collect_results(manager, first_ids[1:] + later_ids, results)
        finally:
            manager.stop(block=True)
        for request_id, prompt in zip(first_ids + later_ids, first + later):
            self.assertEqual(results[request_id], greedy_alone(model, prompt, NEW_TOKENS)[0], request_id)

    def test_raise_policy_fails_the_crossing_request_and_no_other(self):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        model = tiny_phi3_model(attn_implementation="sdpa")
        generation_config = GenerationConfig(
            do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=-1, pad_token_id=0
        )
        config = ContinuousBatchingConfig(auto_switch_to_flash=False, use_async_batching=False, **SETTINGS)
        batch = prompts(CROSSING[0], *SHORT)
        with patches.applied(stale_cache="raise"):
            outputs = list(
                model.generate_batch(
                    batch, generation_config=generation_config, continuous_batching_config=config, progress_bar=False
                ).values()
            )
        self.assertIn("cached tokens were computed with", outputs[0].error or "")
        for prompt, output in zip(batch[1:], outputs[1:]):
            self.assertIsNone(output.error)
            self.assertEqual(output.generated_tokens, greedy_alone(model, prompt, NEW_TOKENS)[0])


@unittest.skipUnless(SUPPORTED, SKIP_REASON)
class ContinuousBatchingUpstreamTest(ContinuousBatchingTestCase):
    """What the patches fix, without them: packed requests share the factors of the longest, crossing ones go stale."""

    def test_upstream_decodes_packed_requests_wrongly(self):
        model = tiny_phi3_model(attn_implementation="sdpa")
        results = continuous_batching_errors(model, prompts(*CROSSING, *SHORT, *LONG), NEW_TOKENS, **SETTINGS)
        self.assertFalse(all(same for same, _ in results), results)


HAS_CONTINUOUS_BATCHING = importlib.util.find_spec("transformers.generation.continuous_batching") is not None


@unittest.skipUnless(
    HAS_CONTINUOUS_BATCHING and not SUPPORTED, "a release with continuous batching the patches do not protect"
)
class UnprotectedContinuousBatchingTest(ContinuousBatchingTestCase):
    def test_warns_when_a_model_with_such_a_rope_starts_it(self):
        from transformers import GenerationConfig

        model = tiny_phi3_model(attn_implementation="sdpa")
        with patches.applied(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.init_continuous_batching(generation_config=GenerationConfig(max_new_tokens=2, eos_token_id=-1))
        messages = [str(warning.message) for warning in caught if warning.category is patches.StaleRopeCacheWarning]
        self.assertTrue(
            any("continuous batching on this transformers release is not protected" in m for m in messages)
        )
