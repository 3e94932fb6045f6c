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
import unittest

from parameterized import parameterized

from transformers import is_torch_available
from transformers.testing_utils import CaptureLogger, require_torch, torch_device
from transformers.utils import logging

from ...generation.test_utils import LongRopeGenerationTester


if is_torch_available():
    import torch

    from transformers import DynamicCache, Phi3ForCausalLM, StaticCache


@require_torch
class Phi3LongRopeDecodingLoopTest(unittest.TestCase):
    """A decoding loop calling the model with its cache across the longrope switch gets the logits without cache."""

    def setUp(self):
        self.model_tester = LongRopeGenerationTester()
        self.switch_length = self.model_tester.switch_length

    def assert_decodes_like_no_cache(self, model, cache, input_ids, start, chunk_size=1):
        for position in range(start, input_ids.shape[1], chunk_size):
            outputs = model(input_ids[:, position : position + chunk_size], cache=cache)
            self.assertIs(outputs.cache, cache)
            for offset in range(outputs.logits.shape[1]):
                reference = model(input_ids[:, : position + offset + 1], use_cache=False).logits[:, -1]
                torch.testing.assert_close(outputs.logits[:, offset], reference, rtol=0, atol=1e-4)

    @parameterized.expand([("dynamic", 1), ("static", 1), ("dynamic", 4)])
    @torch.no_grad()
    def test_decoding_loop_across_the_switch(self, cache_kind, chunk_size):
        model = self.model_tester.get_model(Phi3ForCausalLM)
        input_ids = self.model_tester.get_input_ids(self.switch_length + 8)
        if cache_kind == "dynamic":
            cache = DynamicCache(config=model.config)
        else:
            cache = StaticCache(config=model.config, max_cache_len=input_ids.shape[1])
        model(input_ids[:, : self.switch_length - 4], cache=cache)
        self.assert_decodes_like_no_cache(model, cache, input_ids, self.switch_length - 4, chunk_size)

    @torch.no_grad()
    def test_cache_created_by_the_model(self):
        model = self.model_tester.get_model(Phi3ForCausalLM)
        input_ids = self.model_tester.get_input_ids(self.switch_length + 4)
        outputs = model(input_ids[:, : self.switch_length - 2], output_hidden_states=True)
        for position in range(self.switch_length - 2, input_ids.shape[1]):
            outputs = model(input_ids[:, position : position + 1], cache=outputs.cache, output_hidden_states=True)
            reference = model(input_ids[:, : position + 1], use_cache=False).logits[:, -1]
            torch.testing.assert_close(outputs.logits[:, -1], reference, rtol=0, atol=1e-4)
            self.assertEqual({hidden.shape[1] for hidden in outputs.hidden_states}, {1})

    @torch.no_grad()
    def test_batch_reordered_and_selected_before_the_switch(self):
        model = self.model_tester.get_model(Phi3ForCausalLM)
        input_ids = self.model_tester.get_input_ids(self.switch_length + 4)
        input_ids = torch.cat([input_ids, input_ids.flip(-1)])
        cache = DynamicCache(config=model.config)
        model(input_ids[:, : self.switch_length - 2], cache=cache)
        cache.reorder_cache(torch.tensor([1, 0], device=torch_device))
        cache.batch_select_indices(torch.tensor([0], device=torch_device))
        self.assert_decodes_like_no_cache(model, cache, input_ids[1:], self.switch_length - 2)

    @torch.no_grad()
    def test_cache_cropped_back_below_the_switch(self):
        model = self.model_tester.get_model(Phi3ForCausalLM)
        input_ids = self.model_tester.get_input_ids(self.switch_length + 8)
        cache = DynamicCache(config=model.config)
        model(input_ids[:, : self.switch_length + 4], cache=cache)
        cache.crop(-6)
        self.assert_decodes_like_no_cache(model, cache, input_ids, self.switch_length - 2)

    @torch.no_grad()
    def test_cache_filled_from_embeddings_is_reported(self):
        model = self.model_tester.get_model(Phi3ForCausalLM)
        input_ids = self.model_tester.get_input_ids(self.switch_length + 1)
        cache = DynamicCache(config=model.config)
        model(inputs_embeds=model.get_input_embeddings()(input_ids[:, :-1]), cache=cache)
        with CaptureLogger(logging.get_logger("transformers.modeling_rope_utils")) as captured:
            model(input_ids[:, -1:], cache=cache)
        self.assertIn("was not filled from `input_ids`", captured.out)
