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


if is_torch_available():
    import torch

    from transformers import DynamicCache, Phi3Config, Phi3ForCausalLM, StaticCache


@require_torch
class Phi3LongRopeDecodingLoopTest(unittest.TestCase):
    """
    A decoding loop that calls the model with its cache across the longrope switch gets the logits of the forward pass
    without cache over the same tokens. The tiny model switches after `switch_length` tokens.
    """

    switch_length = 32
    vocab_size = 97
    head_dim = 8
    tolerance = 1e-4

    def get_model(self):
        config = Phi3Config(
            vocab_size=self.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            initializer_range=0.2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            max_position_embeddings=4 * self.switch_length,
            original_max_position_embeddings=self.switch_length,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "original_max_position_embeddings": self.switch_length,
                "short_factor": [1.0 + 0.25 * i for i in range(self.head_dim // 2)],
                "long_factor": [4.0 + 2.0 * i for i in range(self.head_dim // 2)],
            },
        )
        torch.manual_seed(0)
        return Phi3ForCausalLM(config).to(torch_device).eval()

    def get_input_ids(self, length):
        generator = torch.Generator().manual_seed(0)
        return torch.randint(3, self.vocab_size, (1, length), generator=generator).to(torch_device)

    def assert_decodes_like_no_cache(self, model, cache, input_ids, start, chunk_size=1):
        for position in range(start, input_ids.shape[1], chunk_size):
            outputs = model(input_ids[:, position : position + chunk_size], cache=cache)
            self.assertIs(outputs.cache, cache)
            for offset in range(outputs.logits.shape[1]):
                reference = model(input_ids[:, : position + offset + 1], use_cache=False).logits[:, -1]
                torch.testing.assert_close(outputs.logits[:, offset], reference, rtol=0, atol=self.tolerance)

    @parameterized.expand([("dynamic", 1), ("static", 1), ("dynamic", 4)])
    @torch.no_grad()
    def test_decoding_loop_across_the_switch(self, cache_kind, chunk_size):
        model = self.get_model()
        input_ids = self.get_input_ids(self.switch_length + 8)
        if cache_kind == "dynamic":
            cache = DynamicCache(config=model.config)
        else:
            cache = StaticCache(config=model.config, max_cache_len=input_ids.shape[1])
        prompt_length = self.switch_length - 4
        model(input_ids[:, :prompt_length], cache=cache)
        self.assert_decodes_like_no_cache(model, cache, input_ids, prompt_length, chunk_size)

    @torch.no_grad()
    def test_cache_created_by_the_model(self):
        model = self.get_model()
        input_ids = self.get_input_ids(self.switch_length + 4)
        outputs = model(input_ids[:, : self.switch_length - 2], output_hidden_states=True)
        for position in range(self.switch_length - 2, input_ids.shape[1]):
            outputs = model(input_ids[:, position : position + 1], cache=outputs.cache, output_hidden_states=True)
            reference = model(input_ids[:, : position + 1], use_cache=False).logits[:, -1]
            torch.testing.assert_close(outputs.logits[:, -1], reference, rtol=0, atol=self.tolerance)
            self.assertEqual({hidden.shape[1] for hidden in outputs.hidden_states}, {1})

    @torch.no_grad()
    def test_batch_reordered_and_selected_before_the_switch(self):
        model = self.get_model()
        input_ids = self.get_input_ids(self.switch_length + 4)
        input_ids = torch.cat([input_ids, input_ids.flip(-1)])
        cache = DynamicCache(config=model.config)
        model(input_ids[:, : self.switch_length - 2], cache=cache)
        cache.reorder_cache(torch.tensor([1, 0], device=torch_device))
        cache.batch_select_indices(torch.tensor([0], device=torch_device))
        self.assert_decodes_like_no_cache(model, cache, input_ids[1:], self.switch_length - 2)

    @torch.no_grad()
    def test_cache_cropped_back_below_the_switch(self):
        model = self.get_model()
        input_ids = self.get_input_ids(self.switch_length + 8)
        cache = DynamicCache(config=model.config)
        model(input_ids[:, : self.switch_length + 4], cache=cache)
        cache.crop(-6)
        self.assert_decodes_like_no_cache(model, cache, input_ids, self.switch_length - 2)

    @torch.no_grad()
    def test_cache_filled_from_embeddings_is_reported(self):
        model = self.get_model()
        input_ids = self.get_input_ids(self.switch_length + 1)
        cache = DynamicCache(config=model.config)
        model(inputs_embeds=model.get_input_embeddings()(input_ids[:, :-1]), cache=cache)
        logger = logging.get_logger("transformers.modeling_rope_utils")
        with CaptureLogger(logger) as captured:
            model(input_ids[:, -1:], cache=cache)
        self.assertIn("was not filled from `input_ids`", captured.out)
