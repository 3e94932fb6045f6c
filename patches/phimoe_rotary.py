# Copyright 2024 Microsoft and the HuggingFace Inc. team. All rights reserved.
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
"""PhiMoE's rotary `forward` as the patches bind it from 5.0, in the style of its modeling file: it switches to the long
factors and scale by each row's length (upstream's recomputes the short frequencies at every call)."""

import torch
from torch import nn

from .rope_frequencies import current_packed_sequence_lengths, dynamic_rope_update


class PhimoeRotaryEmbedding(nn.Module):
    @torch.no_grad()
    @dynamic_rope_update  # power user: used with advanced RoPE types (e.g. dynamic rope)
    def forward(self, x, position_ids=None):
        # `dynamic_rope_update` has set `inv_freq` to the short or the long factors by the sequence length (of each
        # row, in a batch); the frequencies used to be recomputed here at every call, always the short ones. The scale
        # follows the same rule, chosen on the device (no device->host synchronisation).
        mscale = self.attention_scaling
        rope_parameters = self.config.rope_parameters
        if rope_parameters["rope_type"] != "default":
            packed = current_packed_sequence_lengths()
            if packed is not None and packed.per_token.shape == position_ids.shape:
                # Several sequences packed in a row (continuous batching): each token's own sequence length
                lengths = packed.per_token[..., None]
            else:
                lengths = (position_ids.amax(dim=-1) + 1)[:, None, None]
            uses_long_factors = lengths > rope_parameters["original_max_position_embeddings"]
            mscale = torch.where(
                uses_long_factors,
                torch.tensor(rope_parameters["long_mscale"], dtype=torch.float, device=x.device),
                torch.tensor(rope_parameters["short_mscale"], dtype=torch.float, device=x.device),
            )
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * mscale
        sin = emb.sin() * mscale
        return cos.to(x.dtype), sin.to(x.dtype)
