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
from transformers.testing_utils import require_torch, torch_device


if is_torch_available():
    import torch

    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, StaticCache


class LongRopeGenerationTester:
    """Tiny longrope models switching factors after `switch_length` tokens: a stale cache is off by > 1, rounding < 1e-5."""

    switch_length = 32
    vocab_size = 97
    head_dim = 8

    def get_config(self, config_class):
        return config_class(
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

    def get_model(self, model_class):
        config_class = Phi3Config if model_class is Phi3ForCausalLM else LlamaConfig
        torch.manual_seed(0)
        return model_class(self.get_config(config_class)).to(torch_device).eval()

    def get_input_ids(self, length):
        generator = torch.Generator().manual_seed(0)
        return torch.randint(3, self.vocab_size, (1, length), generator=generator).to(torch_device)

    @torch.no_grad()
    def check_left_padded_generation(self, model, paddings):
        """Generates across the switch from rows left-padded by `paddings`: each row's logits are those of it alone."""
        input_ids = torch.cat([self.get_input_ids(self.switch_length - 2).roll(row) for row in range(len(paddings))])
        for row, padding in enumerate(paddings):
            input_ids[row, :padding] = 0
        generate_kwargs = {"do_sample": False, "return_dict_in_generate": True, "output_logits": True}
        outputs = model.generate(
            input_ids, attention_mask=(input_ids != 0).long(), max_new_tokens=8, **generate_kwargs
        )
        for row, padding in enumerate(paddings):
            for step, logits in enumerate(outputs.logits):
                row_alone = outputs.sequences[row : row + 1, padding : input_ids.shape[1] + step]
                reference = model(row_alone, use_cache=False).logits[0, -1]
                torch.testing.assert_close(logits[row], reference, rtol=0, atol=1e-4)


@require_torch
class LongRopeGenerationTest(unittest.TestCase):
    """`generate()` across the longrope switch gives the logits of the forward pass without cache over the same tokens."""

    def setUp(self):
        self.model_tester = LongRopeGenerationTester()

    @parameterized.expand([("llama", LlamaForCausalLM), ("phi3", Phi3ForCausalLM)])
    @torch.no_grad()
    def test_cache_before_the_switch_is_recomputed_with_the_long_factors(self, _, model_class):
        model = self.model_tester.get_model(model_class)
        switch_length = self.model_tester.switch_length
        input_ids = self.model_tester.get_input_ids(switch_length - 4)
        short_factor_cache = model(input_ids).cache
        outputs = model.generate(input_ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)

        # The cache covers all but the last token; a prefill of those tokens uses the long factors throughout
        fresh_cache = model(outputs.sequences[:, :-1]).cache
        for layer_idx in range(model.config.num_hidden_layers):
            cached_keys = outputs.cache.layers[layer_idx].keys[:, :, : input_ids.shape[1]]
            self.assertFalse(torch.allclose(cached_keys, short_factor_cache.layers[layer_idx].keys, atol=1e-3))
            torch.testing.assert_close(cached_keys, fresh_cache.layers[layer_idx].keys[:, :, : input_ids.shape[1]])

    @parameterized.expand(
        [
            ("llama_greedy", LlamaForCausalLM, {}),
            ("phi3_greedy", Phi3ForCausalLM, {}),
            ("llama_sample", LlamaForCausalLM, {"do_sample": True, "top_k": 0}),
            ("phi3_sample", Phi3ForCausalLM, {"do_sample": True, "top_k": 0}),
            ("llama_prompt_lookup", LlamaForCausalLM, {"prompt_lookup_num_tokens": 3}),
            ("phi3_prompt_lookup", Phi3ForCausalLM, {"prompt_lookup_num_tokens": 3}),
            ("llama_assisted", LlamaForCausalLM, {"assistant": True}),
            ("phi3_assisted", Phi3ForCausalLM, {"assistant": True}),
            # From the switch length itself, where no candidate is left to verify before the switch
            ("phi3_assisted_at_switch", Phi3ForCausalLM, {"assistant": True, "do_sample": True, "at_switch": True}),
            ("llama_static_cache", LlamaForCausalLM, {"static": True}),
            ("phi3_static_cache", Phi3ForCausalLM, {"static": True}),
        ]
    )
    @torch.no_grad()
    def test_generate_across_the_switch(self, _, model_class, generate_kwargs):
        model = self.model_tester.get_model(model_class)
        generate_kwargs = {"do_sample": False, **generate_kwargs}
        if generate_kwargs.pop("assistant", False):
            generate_kwargs["assistant_model"] = self.model_tester.get_model(model_class)
        # A prompt that repeats itself gives prompt lookup and the assistant candidates to verify across the switch
        input_ids = self.model_tester.get_input_ids(self.model_tester.switch_length // 2 - 2).repeat(1, 2)
        if generate_kwargs.pop("at_switch", False):
            input_ids = self.model_tester.get_input_ids(self.model_tester.switch_length)
        if generate_kwargs.pop("static", False):
            generate_kwargs["cache"] = StaticCache(config=model.config, max_cache_len=48)
        torch.manual_seed(0)
        outputs = model.generate(
            input_ids, max_new_tokens=10, return_dict_in_generate=True, output_logits=True, **generate_kwargs
        )
        for step, logits in enumerate(outputs.logits):
            reference = model(outputs.sequences[:, : input_ids.shape[1] + step], use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, reference, rtol=0, atol=1e-4)
        if "cache" in generate_kwargs:
            self.assertIs(outputs.cache, generate_kwargs["cache"])

    def test_left_padded_batch_across_the_switch(self):
        # Every row is padded: the rotary embedding switches at the unpadded length of the longest row
        self.model_tester.check_left_padded_generation(self.model_tester.get_model(LlamaForCausalLM), paddings=(2, 2))

    @parameterized.expand([("llama", LlamaForCausalLM), ("phi3", Phi3ForCausalLM)])
    def test_beam_search_across_the_switch(self, _, model_class):
        model = self.model_tester.get_model(model_class)
        input_ids = self.model_tester.get_input_ids(self.model_tester.switch_length - 3)
        generate_kwargs = {"max_new_tokens": 8, "num_beams": 3, "do_sample": False}
        with_cache = model.generate(input_ids, **generate_kwargs)
        without_cache = model.generate(input_ids, use_cache=False, **generate_kwargs)
        torch.testing.assert_close(with_cache, without_cache)
