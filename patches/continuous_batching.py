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
RoPE frequencies that depend on the sequence length, in continuous batching.

Continuous batching packs the tokens of many requests in one row, and keeps each request's keys and values in a
paged cache. With longrope or dynamic NTK, two things go wrong unless each request is handled as it would be alone:

1. **Per-request frequencies.** The rotary embedding would pick the frequencies of the whole row (its largest
   position), so one long request switches every packed request to the long factors. `with_request_rope_lengths`
   records each token's request length when a batch is prepared (on the host, where the scheduler knows them), and
   `rotate_each_request_alone` lets the rotary embedding read them (`rope_frequencies.packed_sequence_lengths`):
   each token is rotated with the frequencies of its own request's length, chosen on the device.
2. **Stale blocks.** A request that crosses the switch keeps keys computed with the short factors in its blocks.
   `recompute_crossing_requests` applies the stale-cache policy before each batch is scheduled: `"recompute"` (and
   `"rerotate"`, which paged caches do not support) requeues the request as a prefill of its prompt and generated
   tokens, as offloading does, with its blocks freed and not kept for reuse; the other requests are not touched.
   `"raise"` fails that request with a `StaleRopeCacheError` (the others go on), `"warn"` warns once per request,
   `"ignore"` does nothing.

Prefix sharing reuses blocks by their tokens alone, so a block computed with one set of frequencies could serve a
request that needs another: `share_prefix_within_first_regime` and `mark_blocks_within_first_regime` keep sharing to
requests whose length is in the regime of a one-token sequence (short factors, unscaled dynamic NTK).
"""

import warnings
from functools import wraps

import torch

from transformers.generation.continuous_batching.requests import RequestStatus

from .rope_cache_utils import (
    StaleRopeCacheError,
    StaleRopeCacheWarning,
    get_stale_cache_policy,
    rope_frequency_regime,
)
from .rope_frequencies import PackedSequenceLengths, get_rope_type, packed_sequence_lengths


RECOMPUTING_POLICIES = ("recompute", "rerotate")
"""The policies under which a request whose blocks are stale is prefilled again (a paged cache cannot rerotate)."""


def request_length(state) -> int:
    """Every token known for a request: its prompt (all of it, even while a chunk of it is being prefilled) and the
    tokens generated so far. The length a request alone would have at its next forward pass."""
    return len(state.initial_tokens) + len(state.generated_tokens)


def shares_first_regime(config, length: int) -> bool:
    """Whether a sequence of `length` tokens is rotated as a one-token sequence is: only then may it share blocks."""
    return rope_frequency_regime(config, length) == rope_frequency_regime(config, 1)


def batch_sequence_lengths(requests_in_batch, num_tokens: int, device) -> PackedSequenceLengths:
    """
    The length of each token's request in a packed batch of `num_tokens` tokens (padding after the requests' tokens
    gets length 0). Built on the host, from the requests' states, and copied to the device once.
    """
    per_token, distinct = [], []
    for future_state in requests_in_batch:
        length = request_length(future_state.state)
        per_token += [length] * future_state.query_length
        distinct.append(length)
    per_token += [0] * (num_tokens - len(per_token))
    per_token = torch.tensor(per_token, dtype=torch.int64).to(device, non_blocking=True)
    return PackedSequenceLengths(per_token.unsqueeze(0), tuple(distinct))


def with_request_rope_lengths(prepare_batch_tensors):
    """
    Decorates `ContinuousBatchingIOs.prepare_batch_tensors`: once the batch is prepared, records each token's request
    length for the forward pass, and on each request the RoPE regime its cached tokens are computed with.
    """

    @wraps(prepare_batch_tensors)
    def wrapper(self, requests_in_batch, *args, **kwargs):
        prepare_batch_tensors(self, requests_in_batch, *args, **kwargs)
        config = self.cache.config
        self.request_rope_lengths = None
        if rope_frequency_regime(config, 1) is None:
            return
        self.request_rope_lengths = batch_sequence_lengths(self.requests_in_batch, self.num_q_tokens, self.device)
        for future_state in self.requests_in_batch:
            state = future_state.state
            state.rope_cache_regime = rope_frequency_regime(config, request_length(state))

    return wrapper


def rotate_each_request_alone(compute_batch):
    """
    Decorates `ModelRunner.compute_batch` (the forward pass of a batch): rotary embeddings rotate each token with the
    frequencies of its own request's length (see `with_request_rope_lengths`). Asynchronous batching and CUDA graphs
    do not carry those lengths: there a model whose frequencies depend on the length is warned about, once.
    """

    @wraps(compute_batch)
    def wrapper(self, model, batch_data, *args, **kwargs):
        lengths = getattr(self.inputs_and_outputs, "request_rope_lengths", None)
        uses_graphs = getattr(self, "use_cuda_graph_varlen", False) or getattr(self, "use_cuda_graph_decode", False)
        if (lengths is None or uses_graphs) and rope_frequency_regime(model.config, 1) is not None:
            warn_unprotected(self, "asynchronous batching or CUDA graphs")
            lengths = None
        with packed_sequence_lengths(lengths):
            return compute_batch(self, model, batch_data, *args, **kwargs)

    return wrapper


def warn_unprotected(owner, what: str) -> None:
    """Warns, once per `owner`, that continuous batching runs `what`, where requests are not rotated alone."""
    if getattr(owner, "rope_unprotected_warned", False):
        return
    owner.rope_unprotected_warned = True
    warnings.warn(
        f"continuous batching with {what} is not protected: packed requests share the RoPE frequencies of the "
        "longest one, and a request that crosses the switch keeps stale blocks. Use synchronous batching without "
        "CUDA graphs (`use_async_batching=False`, `use_cuda_graph=False`) for exact results.",
        StaleRopeCacheWarning,
        stacklevel=3,
    )


def _stale_requests(scheduler) -> list:
    """The running requests whose cached tokens were computed with other RoPE frequencies than their next forward
    pass needs: a request that has just crossed the switch (or, with dynamic NTK, grown past the maximum)."""
    config = scheduler.cache.config
    stale = []
    for state in list(scheduler.active_requests.values()):
        cached_regime = getattr(state, "rope_cache_regime", None)
        if state.position_offset == 0 or cached_regime is None or state.is_cpu_offloaded:
            continue
        if rope_frequency_regime(config, request_length(state)) != cached_regime:
            stale.append(state)
    return stale


def requeue_for_prefill(scheduler, state) -> None:
    """
    Puts a running request back in the waiting queue as a prefill of its prompt and generated tokens (as offloading
    does, `RequestState.create_equivalent_initial_request`): its blocks are freed and not kept for prefix reuse, its
    generated tokens and log-probabilities are kept, and its result reads as if it had never been interrupted.
    """
    new_state = state.create_equivalent_initial_request()
    scheduler.cache.free_blocks(state.request_id, no_cache=True)
    state._status = RequestStatus.FINISHED
    scheduler.finish_request(state.request_id)
    scheduler.add_waiting_request(new_state)


def _apply_stale_cache_policy(batch_processor, state) -> None:
    scheduler = batch_processor.scheduler
    config = scheduler.cache.config
    policy = get_stale_cache_policy(get_rope_type(config))
    needed = rope_frequency_regime(config, request_length(state))
    message = (
        f"request {state.request_id!r}: its {state.position_offset} cached tokens were computed with the RoPE "
        f"frequencies of {state.rope_cache_regime}, its next forward pass needs those of {needed}"
    )
    if policy in RECOMPUTING_POLICIES:
        requeue_for_prefill(scheduler, state)
    elif policy == "raise":
        # The request fails, with what it generated so far; the others go on
        error = StaleRopeCacheError(f"{message}. Set the stale-cache policy to 'recompute' to prefill it again.")
        batch_processor._handle_request_error(error, state)
        scheduler.finish_request(state.request_id)
    elif policy == "warn" and not getattr(state, "rope_stale_warned", False):
        state.rope_stale_warned = True
        warnings.warn(f"{message}; decoding goes on with stale keys.", StaleRopeCacheWarning, stacklevel=2)


def recompute_crossing_requests(prepare_next_batch):
    """Decorates `ContinuousBatchProcessor.prepare_next_batch`: before the next batch is scheduled, each request whose
    cached tokens are stale gets the stale-cache policy of its RoPE type (see the module's docstring)."""

    @wraps(prepare_next_batch)
    def wrapper(self, *args, **kwargs):
        for state in _stale_requests(self.scheduler):
            _apply_stale_cache_policy(self, state)
        return prepare_next_batch(self, *args, **kwargs)

    return wrapper


def share_prefix_within_first_regime(search_prefix_match):
    """Decorates `PagedAttentionCache.search_prefix_match`: a prompt longer than the first RoPE regime reuses no
    blocks (those were computed with the frequencies of shorter sequences)."""

    @wraps(search_prefix_match)
    def wrapper(self, request_id, prompt_ids, *args, **kwargs):
        if not shares_first_regime(self.config, len(prompt_ids)):
            return 0
        return search_prefix_match(self, request_id, prompt_ids, *args, **kwargs)

    return wrapper


def mark_blocks_within_first_regime(mark_complete_blocks):
    """Decorates `PagedAttentionCache.mark_complete_blocks`: only blocks of a request in the first RoPE regime are
    offered for reuse."""

    @wraps(mark_complete_blocks)
    def wrapper(self, state, *args, **kwargs):
        if not shares_first_regime(self.config, request_length(state)):
            return None
        return mark_complete_blocks(self, state, *args, **kwargs)

    return wrapper
