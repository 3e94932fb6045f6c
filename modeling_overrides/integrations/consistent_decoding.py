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
Batch-invariant linear layers and attention: a token's result does not depend on how many other tokens were computed
with it, so that a decode step through a KV cache gives bitwise the logits of the forward pass without cache.

A decode step multiplies one row by each weight matrix, where the forward pass without cache multiplies the same row
inside a matrix of all the sequence's rows; matrix-product kernels pick their blocking, and so their order of
accumulation, by shape, and the two results differ in the last bits (about 1e-6 in fp32 here; ~0.1 in bf16 on GPU
for a 7B model). Two rules remove the difference:

- every matrix product runs on tiles of a fixed shape (`ROW_TILE` rows for the linear layers, `QUERY_TILE` queries by
  `KEY_BLOCK` keys in attention), padded with zeros, so that each row meets the same kernel whatever came with it;
- attention accumulates over fixed key blocks, aligned at position 0, in a fixed order (online softmax), so that a
  query sees the same arithmetic whether its keys came from the cache or from the same forward pass. Masked and
  padded keys contribute exact zeros.

Reductions outside matrix products (norms, softmax within a block) are row-local already.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


ROW_TILE = 16
"""Rows per matrix product in linear layers: 16 keeps a prefill within ~1.3x of one large product on CPU, while a
decode step (one row, padded to 16) stays bound by reading the weights, as before."""

QUERY_TILE = 16
"""Queries per attention tile."""

KEY_BLOCK = 64
"""Keys per attention block; blocks start at position 0 of the keys, whatever the number of queries."""


def row_invariant_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """
    `F.linear(input, weight, bias)`, computed over tiles of `ROW_TILE` rows: each row's result is the same whether it
    comes alone or among any number of others.
    """
    in_features, out_features = input.shape[-1], weight.shape[0]
    rows = input.reshape(-1, in_features)
    num_rows = rows.shape[0]
    num_tiles = max(1, math.ceil(num_rows / ROW_TILE))
    tiles = F.pad(rows, (0, 0, 0, num_tiles * ROW_TILE - num_rows)).view(num_tiles, ROW_TILE, in_features)
    # `bmm` runs one product of the tile's shape per tile; `matmul` would fold the tiles into one large product
    output = torch.bmm(tiles, weight.t().expand(num_tiles, in_features, out_features))
    output = output.reshape(num_tiles * ROW_TILE, out_features)[:num_rows]
    if bias is not None:
        output = output + bias
    return output.reshape(*input.shape[:-1], out_features)


class Linear(nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return row_invariant_linear(input, self.weight, self.bias)


def _additive_mask(attention_mask, query_length: int, key_length: int, device) -> torch.Tensor:
    """The mask as fp32 additive values over `(..., query_length, key_length)`."""
    if attention_mask is None:
        # As `scaled_dot_product_attention` reads a missing mask (the masking utilities leave it out only where that
        # is right): one query sees every key; several are causal from the first key (a prefill, also of a static
        # cache whose later slots are still empty)
        query_positions = torch.arange(query_length, device=device)[:, None]
        key_positions = torch.arange(key_length, device=device)[None]
        visible = (key_positions <= query_positions) | (query_length == 1)
        return torch.where(visible, 0.0, float("-inf"))[None, None]
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask[..., :key_length], 0.0, float("-inf"))
    return attention_mask[..., :key_length].float()


def consistent_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """
    Attention whose result for a query does not depend on the other queries computed with it, nor on whether its
    keys were cached: queries in tiles of `QUERY_TILE`, keys in blocks of `KEY_BLOCK` from position 0, an online
    softmax accumulated block after block in fp32. Takes the arguments of `eager_attention_forward` and
    `sdpa_attention_forward` (a boolean, additive or absent mask); returns no attention weights.
    """
    batch_size, num_heads, query_length, head_dim = query.shape
    key_value_groups = num_heads // key.shape[1]
    key = key.repeat_interleave(key_value_groups, dim=1)
    value = value.repeat_interleave(key_value_groups, dim=1)
    key_length = key.shape[2]
    scaling = scaling if scaling is not None else head_dim**-0.5

    num_query_tiles = math.ceil(query_length / QUERY_TILE)
    num_key_blocks = math.ceil(key_length / KEY_BLOCK)
    query_padding, key_padding = num_query_tiles * QUERY_TILE - query_length, num_key_blocks * KEY_BLOCK - key_length
    mask = _additive_mask(attention_mask, query_length, key_length, query.device)
    mask = F.pad(mask, (0, key_padding, 0, query_padding), value=float("-inf"))
    mask = mask.expand(batch_size, num_heads, -1, -1)

    num_tiles = batch_size * num_heads * num_query_tiles
    queries = F.pad(query, (0, 0, 0, query_padding)).reshape(num_tiles, QUERY_TILE, head_dim)
    keys = F.pad(key, (0, 0, 0, key_padding))
    values = F.pad(value, (0, 0, 0, key_padding))

    running_max = torch.full((num_tiles, QUERY_TILE, 1), float("-inf"), device=query.device)
    running_sum = torch.zeros((num_tiles, QUERY_TILE, 1), device=query.device)
    accumulator = torch.zeros((num_tiles, QUERY_TILE, head_dim), device=query.device)
    block_shape = (batch_size, num_heads, num_query_tiles, KEY_BLOCK, head_dim)
    for block in range(num_key_blocks):
        keys_and_values = slice(block * KEY_BLOCK, (block + 1) * KEY_BLOCK)
        block_keys = keys[:, :, None, keys_and_values].expand(block_shape).reshape(num_tiles, KEY_BLOCK, head_dim)
        block_values = values[:, :, None, keys_and_values].expand(block_shape).reshape(num_tiles, KEY_BLOCK, head_dim)
        block_mask = mask[..., keys_and_values].reshape(num_tiles, QUERY_TILE, KEY_BLOCK)
        scores = torch.bmm(queries, block_keys.transpose(1, 2)).float() * scaling + block_mask

        new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
        # Rows with every key masked so far keep a zero shift instead of -inf - -inf
        shift = torch.where(torch.isinf(new_max), 0.0, new_max)
        probabilities = torch.exp(scores - shift)
        rescale = torch.exp(torch.where(torch.isinf(running_max), float("-inf"), running_max - shift))
        running_sum = running_sum * rescale + probabilities.sum(dim=-1, keepdim=True)
        accumulator = accumulator * rescale + torch.bmm(probabilities.to(values.dtype), block_values).float()
        running_max = new_max

    output = accumulator / torch.where(running_sum == 0, 1.0, running_sum)
    output = output.to(query.dtype).reshape(batch_size, num_heads, num_query_tiles * QUERY_TILE, head_dim)
    return output[:, :, :query_length].transpose(1, 2).contiguous(), None
