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
Every model of `patches.coverage.MODELS` that the installed release has, tiny and random
(`tiny_model`): with the patches applied, a hand-written loop and greedy `generate()` across the RoPE switch match the
forward pass without cache, with longrope and with dynamic NTK (under `"recompute"`); without them, the loop's cache
is stale at the longrope switch, so that these tests can fail.
"""

import functools
import inspect
import unittest
import warnings

from packaging.version import Version
from parameterized import parameterized

import patches
from patches.coverage import LEFT_OUT_MODELS, protects_continuous_batching
from patches.coverage import MODELS as COVERED_MODELS
from patches.reference import continuous_batching_errors, left_padded_generate_row_errors
from patches.targets import covered_model as covered_module
from patches.targets import installed_era
from transformers.testing_utils import require_torch

from ..cache_consistency_utils import (
    FP32_TOLERANCE,
    SWITCH_POINT,
    TRANSFORMERS_VERSION,
    QuietTestCase,
    generate_errors,
    hand_written_loop_errors,
    no_cache_logits,
    random_tokens,
    reset_dynamic_rope,
    tiny_model,
)


MODELS = [(module_name,) for module_name in sorted(COVERED_MODELS)]

CONTINUOUS_BATCHING_SUPPORTED = protects_continuous_batching(str(TRANSFORMERS_VERSION))

LONGROPE_INIT_HAS_SHORT_FACTORS = Version("4.45") <= TRANSFORMERS_VERSION
"""4.44's longrope init gives these models the long factors at every length: there is no switch to test."""

TOKENS = random_tokens(SWITCH_POINT + 3)
"""Decoded from `SWITCH_POINT - 1` tokens to `SWITCH_POINT + 3`: across the switch, at `SWITCH_POINT + 1`."""


@functools.cache
def model(module_name: str, rope_type: str):
    """The tiny model, built once for the module (the patches replace methods of its classes, not the model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = tiny_model(module_name, rope_type)
    built.generation_config.pad_token_id = 0
    return built


def covered_model(test, module_name: str, rope_type: str = "longrope"):
    """
    The tiny model, or the test skipped: the patches do not cover the model on the installed release (see
    `patches.targets.covered_model`), or its config refuses `rope_type` (Phi-4-multimodal's accepts only longrope, and
    Olmo's before 5.0 only linear and dynamic scaling).
    """
    _, reason = covered_module(module_name)
    if reason is not None:
        test.skipTest(reason)
    try:
        tiny = model(module_name, rope_type)
    except Exception as error:
        # A config's validation error: a `ValueError` (a `TypeError` for a field of the wrong type, 4.57), or from 5.0
        # a strict dataclass's validation error
        if not isinstance(error, (ValueError, TypeError)) and "Validation" not in type(error).__name__:
            raise
        if "rope" not in str(error).lower():
            raise
        test.skipTest(f"this release's {module_name} config refuses {rope_type}: {error}")
    reset_dynamic_rope(tiny)
    return tiny


def upstream_switches_longrope(module_name: str) -> bool:
    """
    Whether upstream's rotary embedding of the model switches the longrope factors (`@dynamic_rope_update`, from
    4.51). Before, it rotates every length with the factors it holds, and the patches give it the switch.
    """
    module, _ = covered_module(module_name)
    rotary_embedding = getattr(module, f"{COVERED_MODELS[module_name].prefix}RotaryEmbedding")
    return "@dynamic_rope_update" in inspect.getsource(rotary_embedding.forward)


@require_torch
class StandardRopeModelsTest(QuietTestCase):
    """The patches applied once for the class, longrope under its default policy and dynamic NTK under "recompute"."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.enterClassContext(patches.applied(stale_cache={"dynamic": "recompute"}))

    def assertMatchesNoCache(self, errors, path: str):
        self.assertGreater(len(errors), 0)
        self.assertLessEqual(max(errors), FP32_TOLERANCE, f"{path}, max |Δlogit| per step: {errors}")

    def assertDecodingMatchesNoCache(self, tiny):
        loop_errors, _ = hand_written_loop_errors(tiny, TOKENS, SWITCH_POINT - 1)
        self.assertMatchesNoCache(loop_errors, "hand-written loop")
        reset_dynamic_rope(tiny)
        _, generate_step_errors = generate_errors(
            tiny, TOKENS[:, : SWITCH_POINT - 1], max_new_tokens=4, do_sample=False
        )
        self.assertMatchesNoCache(generate_step_errors, "greedy generate()")

    def test_every_covered_model_is_patched_completely(self):
        patched = set(patches.status().patched)
        for module_name, model_row in COVERED_MODELS.items():
            prefix = model_row.prefix
            module, _ = covered_module(module_name)
            rotary = f"{prefix}RotaryEmbedding"
            if module_name == "phi3" and installed_era().phi3_rotary_override == "modeling_phi3_v4_46":
                rotary = "Phi3LongRoPEScaledRotaryEmbedding"  # 4.44-4.47: the per-layer rotary embedding
            expected = {
                f"{rotary}.forward",
                f"{prefix}Model.forward",
                f"{prefix}ForCausalLM.forward",
                f"{prefix}ForCausalLM.prepare_inputs_for_generation",
            }
            with self.subTest(module_name):
                if module is None:
                    self.assertFalse(expected & patched)
                else:
                    self.assertLessEqual(expected, patched)
        self.assertFalse(set(LEFT_OUT_MODELS) & set(COVERED_MODELS))

    @parameterized.expand(MODELS)
    def test_longrope_decoding_matches_no_cache(self, module_name):
        self.assertDecodingMatchesNoCache(covered_model(self, module_name, "longrope"))

    @parameterized.expand(MODELS)
    def test_longrope_left_padded_batch_matches_each_row_alone(self, module_name):
        # Each row rotated with the factors of its own length, whatever the rotary embedding returns: `(cos, sin)`, or
        # DeepSeek-V2's one complex `freqs_cis`
        tiny = covered_model(self, module_name, "longrope")
        if module_name == "phimoe" and TRANSFORMERS_VERSION.major < 5:
            self.skipTest("PhiMoE before 5.0 chooses one factor set for the whole batch, as upstream")
        errors = left_padded_generate_row_errors(tiny, max_new_tokens=8)
        self.assertMatchesNoCache(errors, "left-padded generate(), each row against itself alone")

    @parameterized.expand(MODELS)
    def test_dynamic_ntk_decoding_matches_no_cache(self, module_name):
        self.assertDecodingMatchesNoCache(covered_model(self, module_name, "dynamic"))

    @parameterized.expand(MODELS)
    @unittest.skipUnless(CONTINUOUS_BATCHING_SUPPORTED, "continuous batching is protected from 5.23")
    def test_continuous_batching_decodes_each_request_as_alone(self, module_name):
        covered_model(self, module_name, "longrope")  # skips where the patches do not cover it
        # A model of its own: `generate_batch` switches the model's attention to its paged variant
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tiny = tiny_model(module_name, "longrope")
        crossing = [
            TOKENS[0, : SWITCH_POINT - 2].tolist(),
            TOKENS[0, :5].tolist(),
            TOKENS[0, : SWITCH_POINT + 2].tolist(),
        ]
        short = [TOKENS[0, :9].tolist(), TOKENS[0, :5].tolist(), TOKENS[0, :12].tolist()]
        settings = {"num_blocks": 32, "max_batch_tokens": 48, "page_size": 16}

        def exact(prompts) -> bool:
            results = continuous_batching_errors(tiny, prompts, max_new_tokens=4, **settings)
            return all(same and error <= FP32_TOLERANCE for same, error in results)

        try:
            if exact(crossing):
                return
        except Exception as error:  # upstream's continuous batching refuses some models (layer types, caches)
            self.skipIfUpstreamFailsToo(lambda: exact(short), error)
            raise
        self.skipIfUpstreamFailsToo(lambda: exact(short), "not exact across the switch")
        self.fail("continuous batching is not exact across the switch, and upstream's is without one")

    def skipIfUpstreamFailsToo(self, exact_without_switch, error):
        """
        Skips the test when upstream's code, on prompts that never reach the switch, fails or is not exact either:
        the model's continuous batching is wrong whatever the RoPE (linear-attention states, sparse attention, ...).
        """
        policy = patches.status().stale_cache
        patches.revert()
        try:
            upstream_exact = exact_without_switch()
        except Exception as upstream_error:
            self.skipTest(f"upstream's continuous batching fails on it without a switch: {upstream_error}"[:300])
        finally:
            patches.apply(stale_cache=policy)
        if not upstream_exact:
            self.skipTest(f"upstream's continuous batching is not exact on it without a switch ({error})")


@require_torch
class StandardRopeModelsUpstreamTest(QuietTestCase):
    """What the patches fix, without them."""

    @parameterized.expand(MODELS)
    @unittest.skipUnless(LONGROPE_INIT_HAS_SHORT_FACTORS, "this release's longrope init has only the long factors")
    def test_upstream_longrope(self, module_name):
        tiny = covered_model(self, module_name, "longrope")
        if upstream_switches_longrope(module_name):
            # It switches the factors, and the cache filled before the switch is stale
            errors, _ = hand_written_loop_errors(tiny, TOKENS, SWITCH_POINT - 1)
            self.assertGreater(max(errors), 100 * FP32_TOLERANCE, f"max |Δlogit| per step: {errors}")
            return
        # It never switches, rotating every length with the factors it holds (from its init: the long ones on 4.46, the
        # short ones on 4.50): the patches give it the switch, so that one side of it rotates differently
        differences = []
        for length in (SWITCH_POINT, SWITCH_POINT + 3):
            upstream = no_cache_logits(tiny, TOKENS[:, :length])
            with patches.applied():
                switched = no_cache_logits(tiny, TOKENS[:, :length])
            differences.append((switched - upstream).abs().max().item())
        self.assertGreater(
            max(differences), 100 * FP32_TOLERANCE, f"max |Δlogit| below and past the switch: {differences}"
        )
