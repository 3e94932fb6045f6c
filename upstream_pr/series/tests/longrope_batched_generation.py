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
# Merged after the tests of `longrope_generation.py`, into the same file: it uses their `LongRopeGenerationTester`,
# and its imports are theirs (so that the merge adds none)
import unittest

from parameterized import parameterized

from transformers import is_torch_available
from transformers.testing_utils import require_torch, torch_device


if is_torch_available():
    import torch

    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, StaticCache


@require_torch
class LongRopeBatchedGenerationTest(unittest.TestCase):
    """Each row of a left-padded batch switches factors at its own length, as it would be generated alone."""

    def setUp(self):
        self.model_tester = LongRopeGenerationTester()

    @parameterized.expand([("llama", LlamaForCausalLM), ("phi3", Phi3ForCausalLM)])
    def test_rows_cross_the_switch_at_their_own_length(self, _, model_class):
        # The padded row crosses the switch four steps after the other one
        self.model_tester.check_left_padded_generation(self.model_tester.get_model(model_class), paddings=(0, 4))

    def test_rows_rotate_as_alone_in_bfloat16(self):
        rotary_emb = self.model_tester.get_model(LlamaForCausalLM).to(torch.bfloat16).model.rotary_emb
        positions = torch.arange(self.model_tester.switch_length + 2, device=torch_device)
        # The first row crosses the switch, the second (left-padded by 4: padding positions are 1) does not; bf16 rounds
        # the `inv_freq` buffer a row alone rotates with, so each row's set must be rounded too
        position_ids = torch.stack([positions, (positions - 4).clamp(min=1)])
        x = torch.zeros(2, positions.shape[0], self.model_tester.head_dim, dtype=torch.bfloat16, device=torch_device)
        for row in (0, 1):
            alone = rotary_emb(x[row : row + 1], position_ids[row : row + 1])
            batch = [embedding[row : row + 1] for embedding in rotary_emb(x, position_ids)]
            torch.testing.assert_close(batch, list(alone), rtol=0, atol=0)
