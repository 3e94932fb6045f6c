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
from transformers.testing_utils import require_torch


if is_torch_available():
    import torch

    from transformers import DynamicCache, Phi3Config, Phi3ForCausalLM, StaticCache


@require_torch
class Phi3LongRopeCacheTest(unittest.TestCase):
    """
    Decoding with a KV cache across the longrope switch gives the logits of the forward pass without cache over the
    same tokens. The tiny model switches after `switch_point` tokens; its large random weights make a stale cache
    obvious (max |Δlogit| > 1), while fp32 rounding between cached and uncached passes stays below 1e-5.
    """

    switch_point = 32
    tolerance = 1e-4

    def get_model(self):
        head_dim = 8
        config = Phi3Config(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            initializer_range=0.2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            max_position_embeddings=4 * self.switch_point,
            original_max_position_embeddings=self.switch_point,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0 + 0.25 * i for i in range(head_dim // 2)],
                "long_factor": [4.0 + 2.0 * i for i in range(head_dim // 2)],
            },
            rope_theta=10000.0,
            attn_implementation="eager",
        )
        torch.manual_seed(0)
        return Phi3ForCausalLM(config).eval()

    def random_tokens(self, length, batch_size=1):
        generator = torch.Generator().manual_seed(0)
        return torch.randint(3, 97, (batch_size, length), generator=generator)

    @torch.no_grad()
    def no_cache_logits(self, model, input_ids):
        return model(input_ids, use_cache=False).logits[:, -1]

    @torch.no_grad()
    def test_longrope_switches_after_original_max_position_embeddings(self):
        # Guards the tests below: one token past the switch point, position 1 is rotated differently
        rotary_embedding = self.get_model().model.rotary_emb
        hidden = torch.zeros(1)
        at_switch, _ = rotary_embedding(hidden, torch.arange(self.switch_point)[None])
        beyond, _ = rotary_embedding(hidden, torch.arange(self.switch_point + 1)[None])
        self.assertFalse(torch.allclose(at_switch[0, 1], beyond[0, 1]))

    @parameterized.expand([("dynamic", 1), ("static", 1), ("dynamic", 3)])
    @torch.no_grad()
    def test_hand_written_loop_across_the_switch(self, cache_kind, chunk_size):
        model = self.get_model()
        input_ids = self.random_tokens(self.switch_point + 8)
        if cache_kind == "dynamic":
            cache = DynamicCache(config=model.config)
        else:
            cache = StaticCache(config=model.config, max_cache_len=input_ids.shape[1])
        prompt_length = self.switch_point - 4
        model(input_ids[:, :prompt_length], cache=cache)
        for start in range(prompt_length, input_ids.shape[1], chunk_size):
            outputs = model(input_ids[:, start : start + chunk_size], cache=cache)
            self.assertIs(outputs.cache, cache)
            for offset in range(outputs.logits.shape[1]):
                reference = self.no_cache_logits(model, input_ids[:, : start + offset + 1])
                torch.testing.assert_close(outputs.logits[:, offset], reference, rtol=0, atol=self.tolerance)

    @parameterized.expand([("greedy", {}), ("prompt_lookup", {"prompt_lookup_num_tokens": 3})])
    def test_generate_across_the_switch(self, _, generate_kwargs):
        model = self.get_model()
        input_ids = self.random_tokens(self.switch_point - 3)
        outputs = model.generate(
            input_ids,
            max_new_tokens=8,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            **generate_kwargs,
        )
        for step, logits in enumerate(outputs.logits):
            reference = self.no_cache_logits(model, outputs.sequences[:, : input_ids.shape[1] + step])
            torch.testing.assert_close(logits, reference, rtol=0, atol=self.tolerance)

    @torch.no_grad()
    def test_each_row_of_a_left_padded_batch_switches_at_its_own_length(self):
        model = self.get_model()
        padding = 6
        input_ids = self.random_tokens(self.switch_point - 2, batch_size=2)
        attention_mask = torch.ones_like(input_ids)
        input_ids[1, :padding], attention_mask[1, :padding] = 0, 0
        outputs = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
        for row, row_padding in ((0, 0), (1, padding)):
            for step, logits in enumerate(outputs.logits):
                row_alone = outputs.sequences[row : row + 1, row_padding : input_ids.shape[1] + step]
                reference = self.no_cache_logits(model, row_alone)[0]
                torch.testing.assert_close(logits[row], reference, rtol=0, atol=self.tolerance)
