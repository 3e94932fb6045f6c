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
"""Testing PhiMoE's longrope switch and its KV cache (transformers 5.x)."""

import unittest

import torch
from parameterized import parameterized

import patches
from transformers.testing_utils import require_torch

from ...cache_consistency_utils import (
    FP32_TOLERANCE,
    SWITCH_POINT,
    TINY_DECODER,
    TRANSFORMERS_VERSION,
    generate_errors,
    hand_written_loop_errors,
    new_cache,
    random_tokens,
)


SHORT_MSCALE, LONG_MSCALE = 1.0, 1.25


def tiny_phimoe_model(seed: int = 0):
    """A two-layer, two-expert PhiMoE whose longrope factors and scale switch after `SWITCH_POINT` tokens."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    head_dim = TINY_DECODER["hidden_size"] // TINY_DECODER["num_attention_heads"]
    config = PhimoeConfig(
        **TINY_DECODER,
        num_local_experts=2,
        num_experts_per_tok=2,
        max_position_embeddings=4 * SWITCH_POINT,
        original_max_position_embeddings=SWITCH_POINT,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.25 * i for i in range(head_dim // 2)],
            "long_factor": [4.0 + 2.0 * i for i in range(head_dim // 2)],
            "short_mscale": SHORT_MSCALE,
            "long_mscale": LONG_MSCALE,
            "original_max_position_embeddings": SWITCH_POINT,
        },
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return PhimoeForCausalLM(config).eval()


@require_torch
@unittest.skipIf(TRANSFORMERS_VERSION.major < 5, "PhiMoE of 4.46-4.57 is not covered yet")
class PhimoeLongRopeTest(unittest.TestCase):
    def setUp(self):
        self.model = tiny_phimoe_model()

    def rotary_outputs(self, length: int):
        rotary_embedding = self.model.model.rotary_emb
        hidden = torch.zeros(1, length, TINY_DECODER["hidden_size"])
        return rotary_embedding(hidden, position_ids=torch.arange(length)[None])

    def test_upstream_never_switches_to_the_long_factors(self):
        short_cos, _ = self.rotary_outputs(SWITCH_POINT)
        long_cos, _ = self.rotary_outputs(SWITCH_POINT + 1)
        # Same frequencies, only the scale changes: the position-1 angle is the same at both lengths
        torch.testing.assert_close(short_cos[0, 1] / SHORT_MSCALE, long_cos[0, 1] / LONG_MSCALE)

    def test_short_factors_up_to_the_switch_and_long_factors_beyond(self):
        with patches.applied():
            short_cos, _ = self.rotary_outputs(SWITCH_POINT)
            long_cos, _ = self.rotary_outputs(SWITCH_POINT + 1)
        self.assertAlmostEqual(short_cos[0, 0, 0].item(), SHORT_MSCALE, places=6)
        self.assertAlmostEqual(long_cos[0, 0, 0].item(), LONG_MSCALE, places=6)
        self.assertFalse(torch.allclose(short_cos[0, 1] / SHORT_MSCALE, long_cos[0, 1] / LONG_MSCALE))

    @parameterized.expand([("dynamic", "dynamic", 1), ("static", "static", 1), ("chunks", "dynamic", 3)])
    def test_hand_written_loop_matches_no_cache(self, _, cache_kind, chunk_size):
        with patches.applied():
            errors, _ = hand_written_loop_errors(
                self.model,
                random_tokens(SWITCH_POINT + 8),
                SWITCH_POINT - 4,
                past_key_values=new_cache(cache_kind, self.model.config),
                chunk_size=chunk_size,
            )
        self.assertLessEqual(max(errors), FP32_TOLERANCE, errors)

    def test_generate_matches_no_cache(self):
        with patches.applied():
            _, errors = generate_errors(self.model, random_tokens(SWITCH_POINT - 3), max_new_tokens=8, do_sample=False)
        self.assertLessEqual(max(errors), FP32_TOLERANCE, errors)
