"""
Batch-invariant linear layers, activation and attention: a token's result does not depend on how many other tokens
were computed with it, so that a decode step through a KV cache gives bitwise the logits of the forward pass without
cache.

A decode step multiplies one row by each weight matrix, where the forward pass without cache multiplies the same row
inside a matrix of all the sequence's rows. Three things make the two differ in the last bits:

- matrix-product kernels pick their blocking, and so their order of accumulation, by shape (with MKL in fp32 a
  product of 1, 2, 3, 5 or 7 rows rounds differently from one of 4, 8 or more);
- elementwise kernels split a tensor between threads at arbitrary elements, and some (SiLU, sigmoid) compute the
  leftover elements of a thread's share with a scalar formula that rounds differently from their vectorised one;
- attention sums over as many keys as the query sees in a decode step, but over the whole sequence (masked) in the
  forward pass without cache, in a different order.

The rules that remove them, section by section below:

1. **Products**: each linear layer multiplies its rows in a way verified, on the running machine and for the
   layer's shape, dtype and thread count, to give every row the same result whatever rows come with it
   (`RowProducts`: one product, rows padded to a multiple of a few rows, or one product per row). The check runs
   once per shape (`row_products_for`); where no way is row-invariant it raises `RowInvarianceError`.
2. **Activation**: SiLU as `x / (1 + exp(-x))`, whose kernels are vectorised to the last element.
3. **Attention**: queries padded to a multiple of `QUERY_TILE` rows and multiplied by the keys in one product per
   key-value head (products over the head dimension of any multiple of 4 rows give every row the same result);
   softmax with the query's exact maximum, normalised before the values; the sums over keys in blocks of
   `KEY_BLOCK` from key 0, the blocks added as a pairwise tree over a power of two of blocks, so that the masked
   blocks the forward pass without cache adds meet zeros.
4. **Verification** (`verify_kernels`): the checks above on canonical shapes in fp32, bf16 and fp16, in about a
   second, run before consistent decoding is switched on.

Consistent mode is a feature of the run-time patches only, not of the upstream pull request:
`patches.apply(consistent=True)` binds these functions (`consistent_decoding_bindings` in `patches/targets.py`).
"""

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# 1. Products ----------------------------------------------------------------------------------------------------------

MAX_ROWS_PER_PRODUCT = 512
"""Longer inputs are multiplied 512 rows at a time, so that no product is larger than the ones the check ran."""

ROW_COUNTS_CHECKED = (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 64, 200)
"""`row_products_for` multiplies `MAX_ROWS_PER_PRODUCT` rows at once, then in pieces of each of these counts (single
decode steps, a few sequences, ragged tails, prefill-sized products), and compares every row."""

OUTPUT_FEATURES_CHECKED = 1024
"""The check multiplies by at most this many of a weight's output features (a vocabulary-sized head is checked on
its first 1024 rows: the order of accumulation is chosen by the number of rows and the inner dimension, which it
keeps), so that it stays within about a second per shape."""


class RowInvarianceError(RuntimeError):
    """No way of multiplying rows by a weight gives each row the same result whatever rows come with it."""


@dataclass(frozen=True)
class RowProducts:
    """
    How a linear layer multiplies its rows.

    Args:
        rows_per_product: `0` for one product per row (a batch of single-row products, each as a decode step computes
            it); otherwise the rows are padded with zeros to a multiple of this count and multiplied in products of
            at most `MAX_ROWS_PER_PRODUCT` rows.
    """

    rows_per_product: int

    def __call__(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        num_rows, in_features = rows.shape
        if self.rows_per_product == 0 and num_rows > 1:
            weights = weight.t().expand(num_rows, in_features, weight.shape[0])
            return torch.bmm(rows[:, None], weights)[:, 0]
        if num_rows > MAX_ROWS_PER_PRODUCT:
            return torch.cat([self(piece, weight) for piece in rows.split(MAX_ROWS_PER_PRODUCT)])
        # One row (a decode step) of one product per row is a plain product: no padding
        padding = -num_rows % max(self.rows_per_product, 1)
        if padding == 0:
            return F.linear(rows, weight)
        return F.linear(F.pad(rows, (0, 0, 0, padding)), weight)[:num_rows]

    def __str__(self) -> str:
        if self.rows_per_product == 0:
            return "one product per row"
        if self.rows_per_product == 1:
            return "one product"
        return f"one product, rows padded to a multiple of {self.rows_per_product}"


ROW_PRODUCTS_BY_COST = (
    RowProducts(1),
    RowProducts(2),
    RowProducts(0),
    RowProducts(4),
    RowProducts(8),
    RowProducts(16),
)
"""The ways tried, cheapest decode step first. With MKL in fp32 only one product per row is row-invariant (a product
of 1, 2, 3, 5 or 7 rows rounds unlike one of 4 or 8): a decode step then costs what it did, a prefill's products
2.5-8x more. In bf16 and fp16 one product usually is (oneDNN); one product per row would be 100x slower there."""

_row_products: dict[tuple, RowProducts | RowInvarianceError] = {}
_row_products_lock = threading.Lock()


def _cancelling_rows_and_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Random rows and a random weight of `weight`'s shape, dtype and device, made so that any two orders of
    accumulation round visibly differently: each row starts with a large value and ends with its opposite, which the
    weight multiplies alike, so a row's result is the small middle terms, summed with the large ones' rounding.
    """
    generator = torch.Generator(device=weight.device).manual_seed(0)
    out_features, in_features = weight.shape
    rows = torch.randn((MAX_ROWS_PER_PRODUCT, in_features), generator=generator, device=weight.device)
    check_weight = torch.randn((out_features, in_features), generator=generator, device=weight.device)
    rows[:, 0] = 256 * rows[:, 0].sign()
    rows[:, -1] = -rows[:, 0]
    check_weight[:, -1] = check_weight[:, 0]
    return rows.to(weight.dtype), check_weight.to(weight.dtype)


def _is_row_invariant(products: RowProducts, weight: torch.Tensor) -> bool:
    rows, weight = _cancelling_rows_and_weight(weight)
    together = products(rows, weight)
    for count in ROW_COUNTS_CHECKED:
        pieces = torch.cat([products(piece, weight) for piece in rows.split(count)])
        if not torch.equal(pieces, together):
            return False
    return True


class ConsistentDecodingCompileError(RuntimeError):
    """Consistent decoding was traced by `torch.compile`, whose generated kernels it cannot make row-invariant."""


@torch.compiler.disable
def consistent_decoding_does_not_compile():
    """
    Raises `ConsistentDecodingCompileError`. Called where `torch.compile` traces consistent decoding: the kernels it
    generates (fused elementwise operations, its own reductions) replace the verified ones and round unlike the
    forward pass without cache, so a compiled decode step would be silently inexact. Left to run eagerly, so that
    the error is raised, not traced (with `fullgraph=True`, torch.compile's own error names this function).
    """
    raise ConsistentDecodingCompileError(
        "Consistent decoding runs eagerly only: under torch.compile, generated kernels replace its row-invariant ones "
        "and round unlike the forward pass without cache. Decode without torch.compile (for generate(): "
        "`disable_compile=True` in the generation config), or without consistent mode."
    )


def row_products_for(weight: torch.Tensor) -> RowProducts:
    """
    The cheapest way of multiplying rows by `weight` that gives each row the same result whatever rows come with it,
    verified once per device, dtype, shape and thread count on the running machine (`ROW_COUNTS_CHECKED`).

    Raises:
        `RowInvarianceError`: when none of `ROW_PRODUCTS_BY_COST` is row-invariant there.
    """
    key = (weight.device, weight.dtype, tuple(weight.shape), torch.get_num_threads())
    found = _row_products.get(key)  # every product of a decode step asks: no lock once a shape is known
    if found is None:
        with _row_products_lock:
            if key not in _row_products:
                _row_products[key] = _find_row_products(weight)
            found = _row_products[key]
    if isinstance(found, RowInvarianceError):
        raise found
    return found


def _find_row_products(weight: torch.Tensor) -> RowProducts | RowInvarianceError:
    checked = weight.detach()[:OUTPUT_FEATURES_CHECKED]
    with torch.no_grad():
        for products in ROW_PRODUCTS_BY_COST:
            if _is_row_invariant(products, checked):
                return products
    out_features, in_features = weight.shape
    return RowInvarianceError(
        f"Consistent decoding cannot make the products of a {weight.dtype} {in_features}x{out_features} weight on "
        f"{weight.device} row-invariant with {torch.get_num_threads()} threads: none of "
        f"{', '.join(str(products) for products in ROW_PRODUCTS_BY_COST)} gives a row the same result among 1 to 64 "
        "rows here (the BLAS and CPU decide). Use another dtype, thread count or machine, or decode without "
        "consistent mode."
    )


def row_invariant_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(input, weight, bias)`, each row computed as if it came alone (see `row_products_for`)."""
    in_features, out_features = input.shape[-1], weight.shape[0]
    if torch.compiler.is_compiling():
        consistent_decoding_does_not_compile()
    rows = input.reshape(-1, in_features)
    output = row_products_for(weight)(rows, weight)
    if bias is not None:
        output = output + bias
    return output.reshape(*input.shape[:-1], out_features)


class RowInvariantLinear(nn.Linear):
    """
    Holds the `forward` that consistent mode binds onto `torch.nn.Linear` itself (so that every linear layer of the
    process, whatever module builds it, computes each row as if it came alone); the patches never instantiate it.
    It subclasses `nn.Linear` because that is the `self` its `forward` reads (`weight`, `bias`); the binding checks
    only the signature of the `forward` it replaces.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return row_invariant_linear(input, self.weight, self.bias)


# 2. Activation --------------------------------------------------------------------------------------------------------


def row_invariant_silu(input: torch.Tensor) -> torch.Tensor:
    """
    SiLU whose result for an element does not depend on where a thread's share of the tensor ends: `F.silu` and
    `torch.sigmoid` compute the last elements of a share with a scalar formula, `exp` and division are vectorised to
    the end.
    """
    return input / (1 + torch.exp(-input))


class RowInvariantSiLU(nn.SiLU):
    """
    Holds the `forward` that consistent mode binds onto the SiLU classes `ACT2FN` builds (`torch.nn.SiLU`, and
    `SiLUActivation` in 5.x); the patches never instantiate it. It subclasses `nn.SiLU`, the `self` its `forward`
    is bound to; the binding checks only the signature of the `forward` it replaces.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return row_invariant_silu(input)


# 3. Attention ---------------------------------------------------------------------------------------------------------

QUERY_TILE = 4
"""Queries are padded to a multiple of 4 rows: MKL in fp32 rounds a product of 1, 2 or 3 rows unlike one of 4, and
products over the head dimension (or a key block) of any multiple of 4 rows give every row the same result."""

KEY_BLOCK = 64
"""Keys per block of the sums over keys; blocks start at key 0, whatever the number of queries, and are summed in
their order, so the masked blocks a forward pass without cache adds are exact zeros."""

MAX_PASS_BYTES = 256 * 2**20
"""A prefill whose mask, scores, weights and per-block partial outputs would take more memory is computed a few
query tiles at a time (each query's arithmetic is the same either way)."""


def _pass_mask(attention_mask, rows: range, query_length: int, key_length: int, padded_key_length: int, device):
    """
    The additive fp32 mask of the queries `rows` over `(batch, 1 or heads, len(rows) or 1, padded_key_length)`, or
    `None` where nothing is masked. Padding queries (from `query_length` on) see every key; padding keys (from
    `key_length` on) are hidden.
    """
    if attention_mask is None:
        # As `scaled_dot_product_attention` reads a missing mask (the masking utilities leave it out only where that
        # is right): one query sees every key; several are causal from the first key (a prefill, also of a static
        # cache whose later slots are still empty)
        mask = None
        if query_length > 1:
            query_positions = torch.arange(rows.start, rows.stop, device=device)[:, None]
            key_positions = torch.arange(key_length, device=device)[None]
            visible = (key_positions <= query_positions) | (query_positions >= query_length)
            mask = torch.where(visible, 0.0, float("-inf"))[None, None]
    else:
        if attention_mask.shape[2] > 1:
            attention_mask = attention_mask[:, :, rows.start : min(rows.stop, query_length)]
        attention_mask = attention_mask[..., :key_length]
        if attention_mask.dtype == torch.bool:
            mask = torch.where(attention_mask, 0.0, float("-inf"))
        else:
            mask = attention_mask.float()
        if mask.shape[2] > 1 and rows.stop > query_length:
            mask = F.pad(mask, (0, 0, 0, rows.stop - query_length))
    if padded_key_length > key_length:
        mask = torch.zeros((1, 1, 1, key_length), device=device) if mask is None else mask
        mask = F.pad(mask, (0, padded_key_length - key_length), value=float("-inf"))
    return mask


def _to_blocks(tensor: torch.Tensor, rows_per_block: int) -> torch.Tensor:
    """
    `(batch, heads, rows, columns)` padded with zero rows to whole blocks, as
    `(batch, heads, blocks, rows_per_block, columns)`: a contiguous tensor of whole blocks is not copied.
    """
    batch_size, num_heads, num_rows, num_columns = tensor.shape
    padding = -num_rows % rows_per_block
    if padding:
        tensor = torch.cat([tensor, tensor.new_zeros(batch_size, num_heads, padding, num_columns)], dim=2)
    return tensor.reshape(batch_size, num_heads, -1, rows_per_block, num_columns)


def _sum_blocks(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """
    The sum over `dim` of key blocks, as a pairwise tree over a power of two of blocks (zero blocks added): the blocks
    after a query's last key, which a forward pass without cache adds and a decode step does not have, meet zeros
    at every level, so both give the same bits, on any device (elementwise additions only). `dim` is removed.
    """
    dim = dim % tensor.dim()
    num_blocks = tensor.shape[dim]
    padding = (1 << (num_blocks - 1).bit_length()) - num_blocks
    if padding:
        tensor = F.pad(tensor, (0, 0) * (tensor.dim() - 1 - dim) + (0, padding))
    while tensor.shape[dim] > 1:
        half = tensor.shape[dim] // 2
        tensor = tensor.narrow(dim, 0, half) + tensor.narrow(dim, half, half)
    return tensor.squeeze(dim)


def _attention_pass(queries, keys, value_blocks, mask, scaling, dropout, training, return_weights):
    """
    Attention of queries `(batch, kv_heads, groups, queries, head_dim)` (the `groups` heads that share a key-value
    head, `queries` a multiple of `QUERY_TILE`) over keys `(batch, kv_heads, keys, head_dim)` and value blocks
    `(batch, kv_heads, key_blocks, KEY_BLOCK, head_dim)`, with an additive fp32 mask broadcastable to
    `(batch, kv_heads, groups, queries, keys)` or `None`. Returns the fp32 output `(batch, kv_heads, groups, queries,
    head_dim)` and, if `return_weights`, the attention weights `(batch, kv_heads, groups, queries,
    key_blocks * KEY_BLOCK)`.
    """
    batch_size, num_key_value_heads, groups, num_queries, head_dim = queries.shape
    key_length, num_key_blocks = keys.shape[2], value_blocks.shape[2]
    # One product over the head dimension for all the queries of a key-value head: every query meets the same kernel
    # whatever the number of queries (a multiple of 4) and keys
    query_rows = queries.reshape(batch_size, num_key_value_heads, groups * num_queries, head_dim)
    scores = torch.matmul(query_rows, keys.transpose(2, 3)).view(*queries.shape[:4], key_length)
    scores = scores.float() * scaling
    if mask is not None:
        scores = scores + mask

    # The maximum over a query's keys is exact whatever the number of masked keys; a fully masked row keeps a
    # finite shift, so that its probabilities are zeros
    row_max = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    probabilities = torch.exp(scores - row_max)
    if num_key_blocks * KEY_BLOCK > key_length:
        probabilities = F.pad(probabilities, (0, num_key_blocks * KEY_BLOCK - key_length))
    blocks = probabilities.view(*queries.shape[:4], num_key_blocks, KEY_BLOCK)
    # A row that is not fully masked sums to at least 1 (its maximum's exp(0)), a fully masked one to 0, left as 0 / 1
    row_sums = _sum_blocks(blocks.sum(dim=-1), dim=-1)[..., None, None].clamp_min(1.0)
    # Normalised before the values, as eager attention does: a block's partial output stays within the values' range
    weights = blocks / row_sums
    if training and dropout > 0:
        weights = F.dropout(weights, p=dropout, training=True)

    # One product per key block, its partial outputs summed over the blocks
    block_rows = weights.to(value_blocks.dtype).permute(0, 1, 4, 2, 3, 5)
    block_rows = block_rows.reshape(batch_size, num_key_value_heads, num_key_blocks, groups * num_queries, KEY_BLOCK)
    partials = torch.matmul(block_rows, value_blocks).float()
    output = _sum_blocks(partials, dim=2).view(*queries.shape)
    return output, (weights.flatten(-2) if return_weights else None)


def _query_tiles_per_pass(batch_size, num_heads, num_query_tiles, num_key_blocks, head_dim) -> int:
    # The fp32 mask, scores, probabilities and weights and their copies, and the partial outputs of every key block
    bytes_per_query = batch_size * num_heads * num_key_blocks * (6 * KEY_BLOCK + 3 * head_dim) * 4
    return max(1, min(num_query_tiles, MAX_PASS_BYTES // (bytes_per_query * QUERY_TILE)))


def _keys_for_products(key: torch.Tensor) -> torch.Tensor:
    """
    The keys in the one layout the products meet: contiguous (in fp16 a product with keys strided across heads, as a
    forward pass without cache has them, rounds unlike one with contiguous keys, as a cache has them), and at least
    one `KEY_BLOCK` long (MKL in fp32 rounds a product against fewer than about 10 keys unlike one against more: the
    first block's keys are padded to a whole block, which the mask hides).
    """
    keys = key.contiguous()
    if keys.shape[2] < KEY_BLOCK:
        keys = F.pad(keys, (0, 0, 0, KEY_BLOCK - keys.shape[2]))
    return keys


def _grouped_by_key_value_head(mask: torch.Tensor | None, num_key_value_heads: int, groups: int):
    """A pass's mask with its heads split as the queries are, `(key-value head, group)`; a mask shared by every head
    as `(1, 1)`."""
    if mask is None:
        return None
    mask_heads = (num_key_value_heads, groups) if mask.shape[1] > 1 else (1, 1)
    return mask.view(mask.shape[0], *mask_heads, *mask.shape[2:])


def _consistent_attention(module, query, key, value, *, attention_mask, scaling, dropout, return_weights):
    """
    The attention both consistent forwards compute: `(batch, heads, queries, head_dim)` queries over
    `(batch, kv_heads, keys, head_dim)` keys and values, with a boolean, additive or absent mask, returning the output
    `(batch, queries, heads, head_dim)` in the queries' dtype and, if `return_weights`, the attention weights
    `(batch, heads, queries, keys)`.

    Every query meets the same kernels, in the same order of accumulation, whatever the number of queries and whether
    its keys were cached: the queries are padded to whole `QUERY_TILE`s, the keys to at least one `KEY_BLOCK`, the
    values cut into key blocks (see the module docstring, section 3). A long prefill is computed a few query tiles at
    a time (`MAX_PASS_BYTES`), which changes no query's arithmetic. Raises `ConsistentDecodingCompileError` under
    `torch.compile`.
    """
    if torch.compiler.is_compiling():
        consistent_decoding_does_not_compile()
    batch_size, num_heads, query_length, head_dim = query.shape
    num_key_value_heads, key_length = key.shape[1], key.shape[2]
    groups = num_heads // num_key_value_heads
    scaling = scaling if scaling is not None else head_dim**-0.5

    # The queries of the heads sharing a key-value head are multiplied together: keys and values are never repeated
    query_padding = -query_length % QUERY_TILE
    queries = F.pad(query, (0, 0, 0, query_padding)) if query_padding else query
    queries = queries.view(batch_size, num_key_value_heads, groups, -1, head_dim)
    padded_query_length = queries.shape[3]
    keys = _keys_for_products(key)
    value_blocks = _to_blocks(value, KEY_BLOCK)
    num_key_blocks = value_blocks.shape[2]

    query_tiles = _query_tiles_per_pass(
        batch_size, num_heads, padded_query_length // QUERY_TILE, num_key_blocks, head_dim
    )
    outputs, weights = [], []
    for start in range(0, padded_query_length, query_tiles * QUERY_TILE):
        rows = range(start, min(start + query_tiles * QUERY_TILE, padded_query_length))
        mask = _pass_mask(attention_mask, rows, query_length, key_length, keys.shape[2], query.device)
        mask = _grouped_by_key_value_head(mask, num_key_value_heads, groups)
        output, attention_weights = _attention_pass(
            queries[:, :, :, rows.start : rows.stop],
            keys,
            value_blocks,
            mask,
            scaling,
            dropout,
            module.training,
            return_weights,
        )
        outputs.append(output)
        weights.append(attention_weights)

    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=3)
    output = output.reshape(batch_size, num_heads, -1, head_dim)[:, :, :query_length]
    output = output.to(query.dtype).transpose(1, 2).contiguous()
    if not return_weights:
        return output, None
    attention_weights = weights[0] if len(weights) == 1 else torch.cat(weights, dim=3)
    attention_weights = attention_weights.view(batch_size, num_heads, *attention_weights.shape[3:])
    return output, attention_weights[:, :, :query_length, :key_length].to(query.dtype)


def consistent_eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `eager_attention_forward`, batch-invariant: a query's result does not depend on the other queries computed with
    it, nor on whether its keys were cached. Returns the attention weights (after dropout, as eager attention does);
    dropout applies while the module is training.
    """
    return _consistent_attention(
        module, query, key, value, attention_mask=attention_mask, scaling=scaling, dropout=dropout, return_weights=True
    )


def consistent_sdpa_attention_forward(
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
    `sdpa_attention_forward`, batch-invariant (see `consistent_eager_attention_forward`). Like SDPA, returns no
    attention weights; a boolean, additive or absent mask is read as SDPA reads it.
    """
    return _consistent_attention(
        module,
        query,
        key,
        value,
        attention_mask=attention_mask,
        scaling=scaling,
        dropout=dropout,
        return_weights=False,
    )


# 4. Verification ------------------------------------------------------------------------------------------------------

DTYPES_CHECKED = (torch.float32, torch.bfloat16, torch.float16)

ELEMENTWISE_WIDTHS_CHECKED = (72, 1000, 1376)
"""Row widths of the elementwise checks: a rotary half, and intermediate sizes that are no multiple of 64."""


def _check_elementwise(device, dtype) -> list[str]:
    """Why the elementwise functions consistent decoding relies on are not row-invariant here (empty when they are)."""
    functions = {
        "silu": row_invariant_silu,
        "exp": torch.exp,
        "cos": torch.cos,
        "sin": torch.sin,
        "rms norm": lambda rows: rows.float() * torch.rsqrt(rows.float().pow(2).mean(-1, keepdim=True) + 1e-6),
    }
    generator = torch.Generator(device=device).manual_seed(0)
    failures = []
    for width in ELEMENTWISE_WIDTHS_CHECKED:
        rows = (torch.randn((1000, width), generator=generator, device=device) * 3).to(dtype)
        for name, function in functions.items():
            together = function(rows)
            counts = [count for count in (1, 3, 17, 100) if not torch.equal(function(rows[:count]), together[:count])]
            if counts:
                failures.append(f"{name} on rows of {width} ({dtype}) differs computed among {counts} rows")
    return failures


ATTENTION_CHECKS = (
    (150, range(150), (0, 5, 63, 64, 65, 77, 100, 127, 128, 149)),
    (2100, range(2036, 2100), (2047, 2099)),
)
"""`(keys, queries of the forward pass, positions of the decode steps)` of the attention check: every position of a
short sequence, and the last queries of one over more than 32 key blocks (CUDA scans a long dimension in chunks)."""


def _check_attention(device, dtype) -> list[str]:
    """
    Why a decode step's attention differs from the same query's in a forward pass over the sequence (empty when it
    does not): for each of `ATTENTION_CHECKS`, the eager consistent attention of the forward pass's queries (keys and
    values strided across heads, as projections leave them) against the SDPA one of a single query over contiguous
    keys and values, as a cache holds them. The two forwards and the two layouts are the ones a model meets.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    batch_size, num_heads, num_key_value_heads, head_dim = 2, 8, 4, 64
    module = nn.Module().eval()
    failures = []

    def random(heads, sequence_length):
        # Laid out as a model's projections leave them: `(batch, positions, heads, head_dim)` seen head first
        shape = (batch_size, sequence_length, heads, head_dim)
        return torch.randn(shape, generator=generator, device=device).to(dtype).transpose(1, 2)

    for sequence_length, forward_queries, positions in ATTENTION_CHECKS:
        query = random(num_heads, sequence_length)
        key, value = random(num_key_value_heads, sequence_length), random(num_key_value_heads, sequence_length)
        # The whole sequence as a forward pass without cache leaves it (no mask), or its last queries (causal rows)
        queries = slice(forward_queries.start, forward_queries.stop)
        mask = None
        if forward_queries.start > 0:
            key_positions = torch.arange(sequence_length, device=device)
            mask = (key_positions[None] <= key_positions[queries, None])[None, None]
        forward, _ = consistent_eager_attention_forward(module, query[:, :, queries], key, value, mask)
        for position in positions:
            keys, values = key[:, :, : position + 1].contiguous(), value[:, :, : position + 1].contiguous()  # a cache
            step, _ = consistent_sdpa_attention_forward(
                module, query[:, :, position : position + 1], keys, values, None
            )
            if not torch.equal(step[:, 0], forward[:, position - forward_queries.start]):
                failures.append(f"attention ({dtype}) of the query at position {position} differs in a decode step")
    return failures


def verify_kernels(devices: tuple[str, ...] | None = None, dtypes: tuple[torch.dtype, ...] = DTYPES_CHECKED) -> None:
    """
    Checks, on the running machine and with the current thread count, that the kernels consistent decoding relies on
    are row-invariant: the products of canonical weights (`row_products_for`), SiLU, `exp`, rotary `cos`/`sin`, the
    RMS norm and the attention of a decode step against a forward pass over 150 positions. About a second on CPU.
    `devices` defaults to the CPU, and CUDA where there is one.

    Raises:
        `RowInvarianceError`: naming every kernel, dtype and shape that is not.
    """
    if devices is None:
        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    failures = []
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for device in devices:
            for dtype in dtypes:
                for out_features, in_features in ((1376, 512), (512, 1376)):
                    weight = (torch.randn((out_features, in_features), generator=generator) * 0.05).to(device, dtype)
                    try:
                        row_products_for(weight)
                    except RowInvarianceError as error:
                        failures.append(str(error))
                failures += _check_elementwise(device, dtype)
                failures += _check_attention(device, dtype)
    if failures:
        raise RowInvarianceError(
            f"Consistent decoding is not row-invariant on this machine with {torch.get_num_threads()} threads:\n- "
            + "\n- ".join(failures)
        )
