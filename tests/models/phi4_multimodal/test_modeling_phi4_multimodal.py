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
"""Testing the longrope switch of Phi-4-multimodal's text model and its KV cache."""

import unittest

import torch

import patches
from patches.rope_cache_utils import StaleRopeCacheError
from transformers.testing_utils import require_torch

from ...cache_consistency_utils import (
    SWITCH_POINT,
    TINY_IMAGE_SIZE,
    LongRopeDecodingTesterMixin,
    generate_errors,
    left_padded_generate_row_errors,
    new_cache,
    random_tokens,
    tiny_phi4_multimodal_model,
)


try:
    from transformers import Phi4MultimodalForCausalLM
except ImportError:  # before 4.51
    Phi4MultimodalForCausalLM = None


def image_inputs() -> dict:
    """Inputs of one blank image, given with text that holds no image token (the image changes no embedding)."""
    return {
        "image_pixel_values": torch.zeros(1, 1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE),
        "image_sizes": torch.tensor([[TINY_IMAGE_SIZE, TINY_IMAGE_SIZE]]),
        "image_attention_mask": torch.ones(1, 1, 2, 2),
    }


@require_torch
@unittest.skipIf(Phi4MultimodalForCausalLM is None, "Phi-4-multimodal arrived in transformers 4.51")
class Phi4MultimodalLongRopeTest(LongRopeDecodingTesterMixin, unittest.TestCase):
    def setUp(self):
        self.model = tiny_phi4_multimodal_model()

    def test_generate_with_image_inputs_matches_no_cache(self):
        # `generate()` passes the image inputs at every step: its refeed at the switch has them all
        with patches.applied():
            _, errors = generate_errors(
                self.model, random_tokens(SWITCH_POINT - 3), max_new_tokens=8, do_sample=False, **image_inputs()
            )
        self.assertMatchesNoCache(errors)

    def test_each_row_of_a_left_padded_batch_matches_that_row_alone(self):
        with patches.applied():
            errors = left_padded_generate_row_errors(self.model)
        self.assertMatchesNoCache(errors)

    @torch.no_grad()
    def test_recompute_refuses_a_cache_filled_with_image_inputs(self):
        # The record keeps token ids, not images: it cannot feed the prefix again as it was fed, and says so
        input_ids = random_tokens(SWITCH_POINT + 1)
        with patches.applied():
            cache = new_cache("dynamic", self.model.config)
            self.model(input_ids[:, :SWITCH_POINT], past_key_values=cache, **image_inputs())
            with self.assertRaisesRegex(StaleRopeCacheError, "`image_pixel_values`.*does not keep"):
                self.model(input_ids[:, SWITCH_POINT:], past_key_values=cache)
