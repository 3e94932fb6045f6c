"""
Every decoding path across the RoPE switch, each a measurement against the reference (`patches.reference`): the one
list the self-check (`python -m patches check`) and the demo (`scripts/reproduce.py`) decode.

A measurement takes a tiny model whose switch is at `SWITCH_POINT` and returns the max |Δlogit| of each step against
the forward pass without cache over the same tokens (for a batch, each row alone); `inf` marks a step that cannot be
compared (other tokens, other beams, a cache object replaced). Where a path does not exist on the installed release,
the table holds why instead of a measurement.
"""

import copy
from collections.abc import Callable

import torch
from packaging.version import Version

from .coverage import protects_continuous_batching
from .reference import (
    CACHE_KEYWORD,
    continuous_batching_errors,
    decode_on_errors,
    generate_errors,
    hand_written_loop_errors,
    left_padded_generate_row_errors,
)
from .tiny_models import SWITCH_POINT, TRANSFORMERS_VERSION, new_cache, random_tokens


Measurement = Callable[[torch.nn.Module], list[float]]

NEW_TOKENS = 6
"""Tokens decoded on each path: prompts start 3 or 4 below the switch, so that every path crosses it."""


def _loop(cache_kind: str | None, chunk_size: int = 1, cache_keyword: str = CACHE_KEYWORD) -> Measurement:
    """A hand-written loop over a cache of `cache_kind` (`None`: the one the model makes), `chunk_size` tokens a step,
    passed under `cache_keyword`."""

    def measure(model):
        cache = new_cache(cache_kind, model.config) if cache_kind is not None else None
        tokens = random_tokens(SWITCH_POINT + NEW_TOKENS)
        return hand_written_loop_errors(model, tokens, SWITCH_POINT - 4, cache, chunk_size, cache_keyword)[0]

    return measure


def _cropped_back(model) -> list[float]:
    """Decodes past the switch, crops the cache back below it (a rollback), and decodes on."""
    tokens = random_tokens(SWITCH_POINT + NEW_TOKENS)
    cache = new_cache("dynamic", model.config)
    errors, cache = hand_written_loop_errors(model, tokens, SWITCH_POINT - 4, cache)
    cache.crop(SWITCH_POINT - 6 - cache.get_seq_length())  # by the count of tokens removed, as every release takes
    return errors + decode_on_errors(model, tokens, cache, SWITCH_POINT - 6)


def _generate(**generate_kwargs) -> Measurement:
    """`generate()` with `generate_kwargs` from a prompt just below the switch (seeded, for sampling)."""

    def measure(model):
        torch.manual_seed(0)
        prompt = random_tokens(SWITCH_POINT - 3)
        return generate_errors(model, prompt, max_new_tokens=NEW_TOKENS, **generate_kwargs)[1]

    return measure


def _static_cache_generate(model) -> list[float]:
    """`generate()` into the caller's `StaticCache`: its steps, and `inf` if the cache does not hold the sequence at
    the end (it was replaced by another along the way)."""
    prompt = random_tokens(SWITCH_POINT - 3)
    cache = new_cache("static", model.config)
    sequences, errors = generate_errors(
        model, prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **{CACHE_KEYWORD: cache}
    )
    # Every token but the last generated one went through the cache
    kept = cache.get_seq_length() == sequences.shape[1] - 1
    return errors if kept else [*errors, float("inf")]


ASSISTED_LOGITS_LINE_UP = Version("4.46") <= TRANSFORMERS_VERSION
"""Before 4.46 assisted decoding returns logits that do not line up with its tokens, whatever the RoPE (measured with
the default RoPE: max |Δlogit| 4.7 on 4.44.2 and 4.45.2): there its tokens are compared with greedy decoding without
cache."""


def _assisted(model) -> list[float]:
    """Assisted decoding, the assistant a copy of the model with perturbed weights (it proposes tokens the model
    rejects, so that candidates are both kept and cut)."""
    assistant = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in assistant.parameters():
            parameter.add_(0.5 * parameter.std() * torch.randn(parameter.shape, generator=generator))
    prompt = random_tokens(SWITCH_POINT - 3)
    settings = {"max_new_tokens": NEW_TOKENS + 2, "do_sample": False}
    if ASSISTED_LOGITS_LINE_UP:
        return generate_errors(model, prompt, assistant_model=assistant, **settings)[1]
    assisted = model.generate(prompt, assistant_model=assistant, pad_token_id=0, **settings)
    without_cache = model.generate(prompt, use_cache=False, pad_token_id=0, **settings)
    return [0.0 if torch.equal(assisted, without_cache) else float("inf")]


def _prompt_lookup(model) -> list[float]:
    """
    Prompt lookup on a prompt that repeats itself, so that candidates are found: 6 of them a pass, so that a pass
    verifies candidates on both sides of the switch unless they are cut there. The first pass (the prompt and its
    candidates) stays at the switch: a first pass across it is a limit of some releases (see docs/design.md).
    """
    half = random_tokens(SWITCH_POINT // 2 - 3)
    prompt = torch.cat([half, half], dim=-1)
    return generate_errors(model, prompt, max_new_tokens=16, do_sample=False, prompt_lookup_num_tokens=6)[1]


def _beam_search(model) -> list[float]:
    """Beams compared by their tokens: 0 when they are the beams of decoding without cache, `inf` otherwise."""
    prompt = random_tokens(SWITCH_POINT - 3)
    settings = {"max_new_tokens": NEW_TOKENS, "num_beams": 2, "do_sample": False, "pad_token_id": 0}
    same = torch.equal(model.generate(prompt, **settings), model.generate(prompt, use_cache=False, **settings))
    return [0.0 if same else float("inf")]


def _continuous_batching(model) -> list[float]:
    """Packed requests that cross the switch, stay short and start long, each against itself decoded alone (the
    log-probabilities of their tokens; `inf` where the tokens differ)."""
    lengths = (SWITCH_POINT - 4, 5, SWITCH_POINT + 6)
    prompts = [random_tokens(length, seed=index)[0].tolist() for index, length in enumerate(lengths)]
    settings = {"num_blocks": 32, "max_batch_tokens": 48, "page_size": 16}
    return [error for _, error in continuous_batching_errors(model, prompts, max_new_tokens=NEW_TOKENS, **settings)]


def decoding_paths(rows_are_rotated_alone: bool = True, rope_type: str = "longrope") -> dict[str, Measurement | str]:
    """
    Each decoding path across the switch on the installed release: its measurement, or why it is not measured.
    `rows_are_rotated_alone`: whether the patches give each row of a left-padded batch its own RoPE factors for the
    model at hand (where they do not, the batch is rotated as upstream rotates it, and not compared row by row).
    `rope_type`: the model's, `"longrope"` or `"dynamic"`.
    """
    paths = {
        "loop, DynamicCache": _loop("dynamic"),
        "loop, StaticCache": _loop("static"),
        "loop, 3-token chunks": _loop("dynamic", chunk_size=3),
        "loop, cache made by the model": _loop(None),
        "loop, cropped back below the switch": _cropped_back,
        "generate() greedy": _generate(do_sample=False),
        "generate() sampling": _generate(do_sample=True, top_k=0),
        "generate() static cache": _static_cache_generate,
        "generate() beam search": _beam_search,
        "generate() prompt lookup": _prompt_lookup,
        "generate() assisted decoding": _assisted,
        "generate() left-padded batch": lambda model: left_padded_generate_row_errors(model, max_new_tokens=8),
    }
    if CACHE_KEYWORD == "cache":
        paths["loop, deprecated past_key_values="] = _loop("dynamic", cache_keyword="past_key_values")
    if protects_continuous_batching(str(TRANSFORMERS_VERSION)):
        paths["generate_batch() packed requests"] = _continuous_batching
    if rope_type == "dynamic":
        # Measured on a tiny Llama, 5.0 to 5.24: one step off by 8e-2 (upstream, 0.3); see docs/design.md
        paths["generate() prompt lookup"] = (
            "dynamic NTK: a prompt-lookup pass whose candidates cross max_position_embeddings can leave a step off"
        )
    if not rows_are_rotated_alone:
        paths["generate() left-padded batch"] = "this release rotates the batch with one factor set, as upstream"
    if Version("4.46") > TRANSFORMERS_VERSION:
        # Measured with the default RoPE, unpatched: max |Δlogit| 5.5 on 4.45.2
        paths["generate() prompt lookup"] = (
            "before 4.46 prompt lookup reports logits that do not line up with the tokens, whatever the RoPE"
        )
    return paths
