# Copyright 2022 EleutherAI and the HuggingFace Inc. team. All rights reserved.
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
Llama modeling code as it stands in transformers 5.x. Only the members that change are written here; everything else
is upstream's. The decoder's `forward` is decorated with `check_rope_cache` and the causal LM's with
`split_at_rope_switch` (see `rope_cache_utils`); the causal LM's generation inputs are prepared as below. Every model
carrying a copy of these classes (Mistral, Qwen2, Phi-3, PhiMoE, Phi-4-multimodal, ...) changes the same way.
"""

from transformers.generation import GenerationMixin

from ...rope_cache_utils import check_rope_cache_in_generation


class LlamaForCausalLM(GenerationMixin):
    # The generic preparation, once the KV cache has been checked against the RoPE frequencies of the coming forward
    # pass (a cache filled with other frequencies is recomputed in place)
    prepare_inputs_for_generation = check_rope_cache_in_generation(GenerationMixin.prepare_inputs_for_generation)
