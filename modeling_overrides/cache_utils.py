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
"""
The members of `Cache` (`src/transformers/cache_utils.py`) that the pull-request series changes, each as it stands
once its pull request is merged; everything else is upstream's. `make diff` reads them as text.
"""

import torch


class Cache:
    def reset(self):
        """Recursively reset all layers tensors"""
        for layer_idx in range(len(self.layers)):
            self.layers[layer_idx].reset()
        self._longrope_input_ids = None
        self._longrope_long_factors = False

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Reorder the cache for beam search"""
        for layer_idx in range(len(self.layers)):
            self.layers[layer_idx].reorder_cache(beam_idx)
        if self._longrope_input_ids is not None:
            self._longrope_input_ids = self._longrope_input_ids.index_select(
                0, beam_idx.to(self._longrope_input_ids.device)
            )

    def batch_repeat_interleave(self, repeats: int):
        """Repeat and interleave the cache"""
        for layer_idx in range(len(self.layers)):
            self.layers[layer_idx].batch_repeat_interleave(repeats)
        if self._longrope_input_ids is not None:
            self._longrope_input_ids = self._longrope_input_ids.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor):
        """Select indices from the cache"""
        for layer_idx in range(len(self.layers)):
            self.layers[layer_idx].batch_select_indices(indices)
        if self._longrope_input_ids is not None:
            self._longrope_input_ids = self._longrope_input_ids[indices]
