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
"""Testing PhiMoE's longrope switch and its KV cache."""

import math
import unittest

import torch
from packaging.version import Version

import patches
from transformers.testing_utils import require_torch

from ...cache_consistency_utils import (
    LONG_MSCALE,
    SHORT_MSCALE,
    SWITCH_POINT,
    TINY_DECODER,
    TRANSFORMERS_VERSION,
    LongRopeDecodingTesterMixin,
    generate_errors,
    left_padded_batch,
    left_padded_generate_row_errors,
    tiny_phimoe_model,
)


ROTARY_TAKES_POSITIONS = TRANSFORMERS_VERSION.major >= 5
"""From 5.0 PhiMoE's rotary embedding takes positions and can rotate each row by its own length; from 4.46 to 4.57 it
builds one table for the batch's first `seq_len` positions, so the factors are chosen for the whole batch."""


@require_torch
@unittest.skipIf(Version("4.46") > TRANSFORMERS_VERSION, "PhiMoE arrived in transformers 4.46")
class PhimoeLongRopeTest(LongRopeDecodingTesterMixin, unittest.TestCase):
    def setUp(self):
        self.model = tiny_phimoe_model()

    def rotary_cos(self, length: int) -> torch.Tensor:
        """The cosines of positions `0..length-1` in a sequence of `length` tokens, `(length, head_dim)`."""
        rotary_embedding = self.model.model.rotary_emb
        hidden = torch.zeros(1, length, TINY_DECODER["hidden_size"])
        if ROTARY_TAKES_POSITIONS:
            return rotary_embedding(hidden, position_ids=torch.arange(length)[None])[0][0]
        return rotary_embedding(hidden, seq_len=torch.tensor(length))[0]

    @unittest.skipUnless(ROTARY_TAKES_POSITIONS, "4.46-4.57 switch the factors, by the cache index")
    def test_upstream_never_switches_to_the_long_factors(self):
        short_cos, long_cos = self.rotary_cos(SWITCH_POINT), self.rotary_cos(SWITCH_POINT + 1)
        # Same frequencies, only the scale changes: the position-1 angle is the same at both lengths
        torch.testing.assert_close(short_cos[1] / SHORT_MSCALE, long_cos[1] / LONG_MSCALE)

    def test_short_factors_up_to_the_switch_and_long_factors_beyond(self):
        # Exactly at the switch point the short ones: 4.46-4.50 took the long factors (with the short scale) there
        with patches.applied():
            short_cos, long_cos = self.rotary_cos(SWITCH_POINT), self.rotary_cos(SWITCH_POINT + 1)
        self.assertAlmostEqual(short_cos[0, 0].item(), SHORT_MSCALE, places=6)
        self.assertAlmostEqual(long_cos[0, 0].item(), LONG_MSCALE, places=6)
        position_one_angle = (
            1.0 / (self.model.config.rope_scaling or self.model.config.rope_parameters)["short_factor"][0]
        )
        self.assertAlmostEqual(short_cos[1, 0].item(), SHORT_MSCALE * math.cos(position_one_angle), places=5)
        self.assertFalse(torch.allclose(short_cos[1] / SHORT_MSCALE, long_cos[1] / LONG_MSCALE))

    @unittest.skipUnless(ROTARY_TAKES_POSITIONS, "4.46-4.57 choose the factors for the whole batch")
    def test_each_row_of_a_left_padded_batch_matches_that_row_alone(self):
        with patches.applied():
            errors = left_padded_generate_row_errors(self.model)
        self.assertMatchesNoCache(errors)

    @unittest.skipIf(ROTARY_TAKES_POSITIONS, "5.x rotates each row by its own length (tested above)")
    def test_left_padded_batch_matches_the_batch_without_cache(self):
        # 4.46-4.57: the factors are the batch's, chosen by the cache index, with and without a cache alike; the
        # patch keeps that rule and makes the cached batch equal the same padded batch run without cache
        prompt, attention_mask = left_padded_batch(padding=6)
        with patches.applied():
            _, errors = generate_errors(
                self.model, prompt, attention_mask=attention_mask, max_new_tokens=12, do_sample=False
            )
        self.assertMatchesNoCache(errors)
