"""
The reference every cached decoding path is measured against: a forward pass without cache over the same tokens (for
a batch, each row alone). Used by the self-check (`python -m patches check`), the demo and the tests.
"""

import inspect

import torch

from transformers import Phi3ForCausalLM

from .rope_cache_utils import positions_from_attention_mask
from .tiny_models import SWITCH_POINT, new_cache, random_tokens, reset_dynamic_rope


FP32_TOLERANCE = 1e-4
"""Max |Δlogit| accepted against the no-cache reference in fp32. Cached and uncached forward passes of the tiny models
differ by ~1e-7 (matrix products of different shapes round differently); a stale cache differs by ~1e-2 or more."""


CACHE_KEYWORD = "cache" if "cache" in inspect.signature(Phi3ForCausalLM.forward).parameters else "past_key_values"
"""The keyword a forward pass takes its cache under: `cache` from 5.24 (`past_key_values` is then a deprecated alias,
still accepted until 5.40), `past_key_values` before."""


LOGITS_TO_KEEP_ARGUMENT = next(
    (
        name
        for name in ("logits_to_keep", "num_logits_to_keep")
        if name in inspect.signature(Phi3ForCausalLM.forward).parameters
    ),
    None,
)
"""The causal LM's argument for returning only the last logits, by release (4.44 has none)."""


@torch.no_grad()
def no_cache_logits(model, input_ids, attention_mask=None) -> torch.Tensor:
    """Logits of the last token from a forward pass without cache over `input_ids`: the reference."""
    reset_dynamic_rope(model)
    position_ids = None
    if attention_mask is not None:
        position_ids = positions_from_attention_mask(attention_mask)
    outputs = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return outputs.logits[:, -1]


@torch.no_grad()
def hand_written_loop_errors(
    model, input_ids, prompt_length: int, past_key_values=None, chunk_size: int = 1, cache_keyword=CACHE_KEYWORD
):
    """
    Feeds `input_ids[:, :prompt_length]` and then the rest, `chunk_size` tokens at a time, through a cache as a
    hand-written loop does (`model(new_tokens, cache=cache)`, or `past_key_values=cache` before 5.24; another
    `cache_keyword` tests a deprecated alias), and returns for each new token the max |Δlogit| against the no-cache
    reference, and the cache at the end.
    """
    outputs = model(input_ids[:, :prompt_length], **{cache_keyword: past_key_values}, use_cache=True)
    cache = outputs.past_key_values
    errors = []
    for start in range(prompt_length, input_ids.shape[1], chunk_size):
        chunk = input_ids[:, start : start + chunk_size]
        outputs = model(chunk, **{cache_keyword: cache}, use_cache=True)
        assert outputs.logits.shape[1] == chunk.shape[1], "the logits must cover the caller's tokens only"
        if isinstance(cache, tuple):
            # A legacy cache (4.44-4.46, created by the model) is not updated in place: a new tuple comes back
            cache = outputs.past_key_values
        assert outputs.past_key_values is cache, "the caller's cache object must be kept"
        for offset in range(chunk.shape[1]):
            reference = no_cache_logits(model, input_ids[:, : start + offset + 1])
            errors.append((outputs.logits[:, offset] - reference).abs().max().item())
    return errors, cache


@torch.no_grad()
def decode_on_errors(model, tokens, cache, start: int, stop: int | None = None) -> list[float]:
    """
    Feeds `tokens[:, start:stop]` one at a time through `cache` (which holds the first `start`, a rolled-back cache
    say) and returns the max |Δlogit| of each step against the no-cache reference.
    """
    errors = []
    for index in range(start, tokens.shape[1] if stop is None else stop):
        logits = model(tokens[:, index : index + 1], **{CACHE_KEYWORD: cache}, use_cache=True).logits[:, -1]
        errors.append((logits - no_cache_logits(model, tokens[:, : index + 1])).abs().max().item())
    return errors


def left_padded_batch(padding: int, pad_token_id: int = 0) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Two rows of `SWITCH_POINT - 2` token slots; the second is left-padded by `padding` (it is shorter)."""
    prompt = random_tokens(SWITCH_POINT - 2, batch_size=2)
    attention_mask = torch.ones_like(prompt)
    attention_mask[1, :padding] = 0
    prompt[1, :padding] = pad_token_id
    return prompt, attention_mask


@torch.no_grad()
def left_padded_generate_row_errors(model, padding: int = 6, max_new_tokens: int = 12, **generate_kwargs):
    """
    Greedy `generate()` on `left_padded_batch(padding)`; returns, for each row and step, the max |Δlogit| against
    that row alone without cache (see `row_alone_errors`).
    """
    prompt, attention_mask = left_padded_batch(padding)
    outputs = model.generate(
        prompt,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
        **generate_kwargs,
    )
    return row_alone_errors(model, outputs.sequences, outputs.logits, attention_mask, prompt.shape[1])


def row_alone_errors(model, sequences, step_logits, attention_mask, prompt_length: int) -> list[float]:
    """Max |Δlogit| of each row at each step against that row alone (no padding) without cache."""
    errors = []
    for row in range(sequences.shape[0]):
        padding = int((attention_mask[row] == 0).sum())
        for step, logits in enumerate(step_logits):
            row_alone = sequences[row : row + 1, padding : prompt_length + step]
            errors.append((logits[row] - no_cache_logits(model, row_alone)[0]).abs().max().item())
    return errors


@torch.no_grad()
def generate_errors(model, input_ids, attention_mask=None, **generate_kwargs):
    """
    Runs `generate()` and returns the generated sequences and, for every generated token, the max |Δlogit| between
    the logits `generate()` saw and the no-cache reference over the same tokens.
    """
    outputs = model.generate(
        input_ids,
        attention_mask=attention_mask,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=model.config.pad_token_id,
        **generate_kwargs,
    )
    prompt_length = input_ids.shape[1]
    errors = []
    for step, step_logits in enumerate(outputs.logits):
        length = prompt_length + step
        mask = attention_mask
        if attention_mask is not None:
            extra = torch.ones(attention_mask.shape[0], step, dtype=attention_mask.dtype)
            mask = torch.cat([attention_mask, extra], dim=-1)
        reference = no_cache_logits(model, outputs.sequences[:, :length], attention_mask=mask)
        errors.append((step_logits - reference).abs().max().item())
    return outputs.sequences, errors


@torch.no_grad()
def greedy_alone(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """
    The reference for a batch or a server: one request decoded alone, greedily, every step a forward pass without cache
    over all its tokens. Returns the generated tokens and the log-probability of each.
    """
    reset_dynamic_rope(model)
    ids, logprobs = list(prompt), []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids], device=model.device), use_cache=False).logits[0, -1].float()
        token = int(logits.argmax())
        logprobs.append(torch.log_softmax(logits, dim=-1)[token].item())
        ids.append(token)
    return ids[len(prompt) :], logprobs


def continuous_batching_errors(model, prompts: list[list[int]], max_new_tokens: int, **batching_settings):
    """
    Decodes `prompts` together with `model.generate_batch` (synchronous batching, greedy, the paged variant of the
    model's attention) and compares each request with `greedy_alone`: returns, per request, whether its tokens are the
    reference's and the max |Δ log-probability| of its tokens (`inf` where the tokens differ).

    Raises:
        RuntimeError: a request failed (its error is in the message).
    """
    from transformers import ContinuousBatchingConfig, GenerationConfig

    generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=-1, pad_token_id=0
    )
    settings = {"auto_switch_to_flash": False, "use_async_batching": False, "return_logprobs": True}
    settings.update(batching_settings)
    outputs = model.generate_batch(
        prompts,
        generation_config=generation_config,
        continuous_batching_config=ContinuousBatchingConfig(**settings),
        progress_bar=False,
    )
    failed = {request_id: output.error for request_id, output in outputs.items() if output.error is not None}
    if failed:
        raise RuntimeError(f"generate_batch failed requests: {failed}")
    results = []
    for prompt, output in zip(prompts, outputs.values()):
        tokens, logprobs = greedy_alone(model, prompt, max_new_tokens)
        if output.generated_tokens != tokens:
            results.append((False, float("inf")))
            continue
        errors = [abs(got - expected) for got, expected in zip(output.logprobs, logprobs)]
        results.append((True, max(errors)))
    return results


@torch.no_grad()
def last_logits_without_cache(model, input_ids) -> torch.Tensor:
    """The last token's logits of a forward pass without cache (the reference), in fp32."""
    last_only = {LOGITS_TO_KEEP_ARGUMENT: 1} if LOGITS_TO_KEEP_ARGUMENT else {}
    return model(input_ids, use_cache=False, **last_only).logits[:, -1].float()


@torch.no_grad()
def first_token_divergence(model, prompt: torch.Tensor) -> list[float]:
    """
    Max |Δ| per hidden state (0 = embeddings), then for the logits, of the first generated token: as a decode step
    after a prefill of `prompt` into a cache, against the last position of one forward pass without cache.
    """
    prompt = prompt.to(model.device)
    cache = new_cache("dynamic", model.config)
    prefill = model(prompt, past_key_values=cache, use_cache=True)
    next_token = prefill.logits[:, -1:].argmax(-1)
    cached = model(next_token, past_key_values=cache, use_cache=True, output_hidden_states=True)
    reference = model(torch.cat([prompt, next_token], dim=-1), use_cache=False, output_hidden_states=True)
    errors = [
        (state[:, -1].float() - reference_state[:, -1].float()).abs().max().item()
        for state, reference_state in zip(cached.hidden_states, reference.hidden_states)
    ]
    errors.append((cached.logits[:, -1].float() - reference.logits[:, -1].float()).abs().max().item())
    return errors
