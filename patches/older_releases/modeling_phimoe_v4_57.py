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
"""
PhiMoE modeling code as it stands in transformers 4.57 (4.46 to 4.57). The rotary embedding there builds a cos/sin
table for the first `seq_len` positions of the batch (`seq_len` being the cache index of the last token plus one),
and the attention layers index it with `position_ids`. It is called without positions, so it chooses one factor set
for the whole batch, by the batch's index: what changes here is how it chooses. The cache checks follow the same
batch-wide rule: the decoder's `forward` is decorated with `check_rope_cache(frequencies_per_row=False)`, the causal
LM's with `split_at_rope_switch(frequencies_per_row=False)`, and generation inputs are prepared as below.

Only the methods that change are written here; everything else is upstream's.
"""

import torch
from torch import nn

from transformers.generation import GenerationMixin

from ..rope_cache_utils import check_rope_cache_in_generation
from ..rope_frequencies import get_longrope_switch_point


class PhimoeRotaryEmbedding(nn.Module):
    def forward(self, x, seq_len=None):
        if self.rope_type != "longrope" or seq_len is None:
            inv_freq, mscale = self.rope_init_fn(self.config, x.device, seq_len)
        else:
            # The factors and the scale follow one rule, long beyond `original_max_position_embeddings` (the factors
            # used to switch one token early in some releases), chosen on the device: no device->host synchronisation
            switch_point = get_longrope_switch_point(self.config)
            short_inv_freq, short_scaling = self.rope_init_fn(self.config, x.device, 1)
            long_inv_freq, long_scaling = self.rope_init_fn(self.config, x.device, switch_point + 1)
            short_mscale = self.short_mscale if self.short_mscale is not None else short_scaling
            long_mscale = self.long_mscale if self.long_mscale is not None else long_scaling
            uses_long_factors = torch.as_tensor(seq_len, device=x.device) > switch_point
            inv_freq = torch.where(uses_long_factors, long_inv_freq, short_inv_freq)
            mscale = torch.where(
                uses_long_factors,
                torch.tensor(long_mscale, dtype=torch.float32, device=x.device),
                torch.tensor(short_mscale, dtype=torch.float32, device=x.device),
            )
        t = torch.arange(seq_len, device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)

        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * mscale).to(x.dtype), (emb.sin() * mscale).to(x.dtype)


class PhimoeForCausalLM(GenerationMixin):
    # The generic preparation, once the KV cache has been checked against the RoPE frequencies of the coming forward
    # pass (a cache filled with other frequencies is recomputed in place); the frequencies are the whole batch's
    prepare_inputs_for_generation = check_rope_cache_in_generation(
        GenerationMixin.prepare_inputs_for_generation, frequencies_per_row=False
    )
