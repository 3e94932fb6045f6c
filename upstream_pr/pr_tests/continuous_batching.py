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

from transformers import is_torch_available
from transformers.testing_utils import require_torch


if is_torch_available():
    import torch

    from transformers import ContinuousBatchingConfig, GenerationConfig, Phi3Config, Phi3ForCausalLM


@require_torch
class ContinuousBatchingLongRopeTest(unittest.TestCase):
    """
    `generate_batch` with a longrope model: each request's tokens are those of greedy decoding of that request alone
    without cache, for requests that cross the switch while decoding, stay below it, or start past it, packed together.
    """

    switch_point = 32
    new_tokens = 8

    def get_model(self, attn_implementation):
        head_dim = 8
        config = Phi3Config(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4 * self.switch_point,
            original_max_position_embeddings=self.switch_point,
            initializer_range=0.2,
            pad_token_id=0,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "original_max_position_embeddings": self.switch_point,
                "short_factor": [1.0 + 0.25 * i for i in range(head_dim // 2)],
                "long_factor": [4.0 + 2.0 * i for i in range(head_dim // 2)],
            },
            attn_implementation=attn_implementation,
        )
        torch.manual_seed(0)
        return Phi3ForCausalLM(config).eval()

    @torch.no_grad()
    def greedy_alone(self, model, prompt):
        ids = list(prompt)
        for _ in range(self.new_tokens):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        return ids[len(prompt) :]

    def test_each_request_decodes_as_alone(self):
        generator = torch.Generator().manual_seed(0)
        lengths = (self.switch_point - 4, 5, self.switch_point + 8, self.switch_point - 2, 10)
        prompts = [torch.randint(3, 97, (length,), generator=generator).tolist() for length in lengths]
        generation_config = GenerationConfig(
            do_sample=False, max_new_tokens=self.new_tokens, eos_token_id=-1, pad_token_id=0
        )
        for attn_implementation in ("sdpa", "eager"):
            model = self.get_model(attn_implementation)
            config = ContinuousBatchingConfig(
                auto_switch_to_flash=False, use_async_batching=False, num_blocks=48, max_batch_tokens=24, page_size=16
            )
            outputs = model.generate_batch(
                prompts, generation_config=generation_config, continuous_batching_config=config, progress_bar=False
            )
            for prompt, output in zip(prompts, outputs.values()):
                with self.subTest(attn_implementation=attn_implementation, prompt_length=len(prompt)):
                    self.assertEqual(output.generated_tokens, self.greedy_alone(model, prompt))
