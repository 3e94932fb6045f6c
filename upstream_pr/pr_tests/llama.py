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

    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
    from transformers.rope_cache_utils import get_stale_cache_policy, set_stale_cache_policy


@require_torch
class LlamaSequenceDependentRopeCacheTest(unittest.TestCase):
    """
    Decoding with a KV cache gives the logits of the forward pass without cache over the same tokens, for RoPE types
    whose frequencies depend on the sequence length: longrope (short factors up to `original_max_position_embeddings`,
    long beyond) and dynamic NTK (new frequencies at every length beyond `max_position_embeddings`, recomputed with
    `stale_cache="recompute"`). fp32 rounding between cached and uncached passes on this tiny model stays below 1e-5.
    """

    switch_point = 32
    tolerance = 1e-4

    def get_model(self, rope_type):
        head_dim = 8
        rope_scaling = {"rope_type": rope_type}
        if rope_type == "longrope":
            rope_scaling["short_factor"] = [1.0 + 0.25 * i for i in range(head_dim // 2)]
            rope_scaling["long_factor"] = [4.0 + 2.0 * i for i in range(head_dim // 2)]
            rope_scaling["original_max_position_embeddings"] = self.switch_point
        else:
            rope_scaling["factor"] = 2.0
        extra = {"original_max_position_embeddings": self.switch_point} if rope_type == "longrope" else {}
        config = LlamaConfig(
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
            max_position_embeddings=4 * self.switch_point if rope_type == "longrope" else self.switch_point,
            rope_scaling=rope_scaling,
            rope_theta=10000.0,
            attn_implementation="eager",
            **extra,
        )
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()

    def setUp(self):
        self.previous_policy = {rope_type: get_stale_cache_policy(rope_type) for rope_type in ("longrope", "dynamic")}
        set_stale_cache_policy("recompute")

    def tearDown(self):
        set_stale_cache_policy(self.previous_policy)

    def random_tokens(self, length):
        generator = torch.Generator().manual_seed(0)
        return torch.randint(3, 97, (1, length), generator=generator)

    @torch.no_grad()
    def no_cache_logits(self, model_factory, input_ids):
        # A fresh model: the dynamic NTK update remembers the longest sequence it has seen
        return model_factory()(input_ids, use_cache=False).logits[:, -1]

    @torch.no_grad()
    def test_longrope_switches_after_original_max_position_embeddings(self):
        # Guards the tests below: one token past the switch point, position 1 is rotated differently
        rotary_embedding = self.get_model("longrope").model.rotary_emb
        hidden = torch.zeros(1)
        at_switch, _ = rotary_embedding(hidden, torch.arange(self.switch_point)[None])
        beyond, _ = rotary_embedding(hidden, torch.arange(self.switch_point + 1)[None])
        self.assertFalse(torch.allclose(at_switch[0, 1], beyond[0, 1]))

    @parameterized.expand([("longrope",), ("dynamic",)])
    @torch.no_grad()
    def test_hand_written_loop(self, rope_type):
        model = self.get_model(rope_type)
        input_ids = self.random_tokens(self.switch_point + 6)
        cache = DynamicCache(config=model.config)
        prompt_length = self.switch_point - 3
        model(input_ids[:, :prompt_length], cache=cache)
        for position in range(prompt_length, input_ids.shape[1]):
            logits = model(input_ids[:, position : position + 1], cache=cache).logits[:, -1]
            reference = self.no_cache_logits(lambda: self.get_model(rope_type), input_ids[:, : position + 1])
            torch.testing.assert_close(logits, reference, rtol=0, atol=self.tolerance)

    def test_generate_with_longrope(self):
        model = self.get_model("longrope")
        input_ids = self.random_tokens(self.switch_point - 3)
        outputs = model.generate(
            input_ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        for step, logits in enumerate(outputs.logits):
            sequence = outputs.sequences[:, : input_ids.shape[1] + step]
            reference = self.no_cache_logits(lambda: model, sequence)
            torch.testing.assert_close(logits, reference, rtol=0, atol=self.tolerance)
