"""
Shared helpers for the cache-consistency tests and the demo: tiny models with a small RoPE switch point, and the
reference every cached decoding path is measured against, a forward pass without cache over the same tokens.
"""

import inspect

import torch
from packaging.version import Version

import patches
import transformers
from modeling_overrides.rope_cache_utils import rope_frequency_regime
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, StaticCache


SWITCH_POINT = 32
"""`original_max_position_embeddings` of the tiny longrope models: sequences longer than this use the long factors."""

FP32_TOLERANCE = 1e-4
"""Max |Δlogit| accepted against the no-cache reference in fp32. Cached and uncached forward passes of the tiny models
differ by ~1e-7 (matrix products of different shapes round differently); a stale cache differs by ~1e-2 or more."""


TRANSFORMERS_VERSION = Version(transformers.__version__)

LOGITS_TO_KEEP_ARGUMENT = next(
    (
        name
        for name in ("logits_to_keep", "num_logits_to_keep")
        if name in inspect.signature(Phi3ForCausalLM.forward).parameters
    ),
    None,
)
"""The causal LM's argument for returning only the last logits, by release (4.44 has none)."""

REPORTS_SPECULATIVE_LOGITS_PER_TOKEN = Version("4.45") <= TRANSFORMERS_VERSION
"""4.44's assisted decoding returns `output_logits` that do not line up with the tokens (seen even without RoPE
scaling); its generated tokens are still checked against no-cache greedy decoding."""

ACCEPTS_LEGACY_CACHE = Version("4.47.99") > TRANSFORMERS_VERSION
"""Up to 4.47, Phi-3 takes legacy caches (tuples of per-layer `(key, value)` tuples) and returns them as tuples."""

CACHE_KEYWORD = "cache" if "cache" in inspect.signature(Phi3ForCausalLM.forward).parameters else "past_key_values"
"""The keyword a forward pass takes its cache under: `cache` from 5.24 (`past_key_values` is then a deprecated alias,
still accepted until 5.40), `past_key_values` before."""

SUPPORTS_STATIC_CACHE_GENERATION = getattr(Phi3ForCausalLM, "_supports_static_cache", True)
"""`generate(cache_implementation="static")` and a caller's `StaticCache` in `generate()` exist for Phi-3 from 4.48."""


DYNAMIC_NTK_FACTOR = 2.0
"""`factor` of the tiny dynamic NTK models, whose frequencies change past `max_position_embeddings`."""


def _rope_config(
    rope_type: str, switch_point: int, head_dim: int, type_key: str = "type", longrope_factors=None
) -> dict:
    """
    RoPE settings as each release spells them: `rope_parameters` on 5.x, `rope_scaling` before (Phi-3's 4.x config
    wants the key `type`, other models accept `rope_type`). `longrope_factors` is `(short, long)`, by default factors
    far apart, so that a stale cache is obvious.
    """
    scaling = {}
    if rope_type == "longrope":
        short_factor, long_factor = longrope_factors or (
            [1.0 + 0.25 * i for i in range(head_dim // 2)],
            [4.0 + 2.0 * i for i in range(head_dim // 2)],
        )
        scaling = {"short_factor": list(short_factor), "long_factor": list(long_factor)}
    elif rope_type == "dynamic":
        scaling = {"factor": DYNAMIC_NTK_FACTOR}
    if TRANSFORMERS_VERSION.major >= 5:
        rope_parameters = {"rope_type": rope_type, "rope_theta": 10000.0, **scaling}
        if rope_type == "longrope":
            rope_parameters["original_max_position_embeddings"] = switch_point
        return {"rope_parameters": rope_parameters}
    rope_scaling = {type_key: rope_type, **scaling} if rope_type != "default" else None
    return {"rope_scaling": rope_scaling, "rope_theta": 10000.0}


def longrope_factor_profile(head_dim: int) -> tuple[list[float], list[float]]:
    """
    `(short_factor, long_factor)` shaped like those of the long-context Phi-3 checkpoints: close to 1 for the
    fast-rotating dimensions, rising for the slow ones to about 2.5 (short) and 64 (long). Written here, not read from a
    checkpoint: the real-size tests and the benchmark use it with random weights.
    """
    steps = [i / (head_dim // 2 - 1) for i in range(head_dim // 2)]
    return [1.0 + 1.5 * t**4 for t in steps], [1.0 + 63.0 * t**3 for t in steps]


TINY_DECODER = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    # Large random weights make a stale cache obvious (max |Δlogit| > 1 rather than ~1e-2)
    "initializer_range": 0.2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
"""The sizes and special tokens shared by the tiny models (head dimension 8)."""


def tiny_phi3_config(
    rope_type: str = "longrope", switch_point: int = SWITCH_POINT, longrope_factors=None, **overrides
) -> Phi3Config:
    """
    A two-layer Phi-3 config whose longrope factors switch after `switch_point` tokens. `overrides` may change the
    sizes too (the factors follow the head dimension); `longrope_factors` is `(short, long)` (see `_rope_config`).
    """
    sizes = {**TINY_DECODER, **overrides}
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    config = {
        **TINY_DECODER,
        "max_position_embeddings": 4 * switch_point,
        # On 5.x the switch point must also be given at the top level, or it silently stays 4096
        "original_max_position_embeddings": switch_point,
        **_rope_config(rope_type, switch_point, head_dim, longrope_factors=longrope_factors),
        **overrides,
    }
    return Phi3Config(**config)


def tiny_phi3_model(
    rope_type: str = "longrope", seed: int = 0, attn_implementation: str = "eager", **overrides
) -> Phi3ForCausalLM:
    """A randomly initialised tiny Phi-3 causal LM in eval mode (fp32, eager attention unless asked otherwise)."""
    torch.manual_seed(seed)
    config = tiny_phi3_config(rope_type, attn_implementation=attn_implementation, **overrides)
    return Phi3ForCausalLM(config).eval()


def tiny_llama_config(rope_type: str = "longrope", switch_point: int = SWITCH_POINT, **overrides) -> LlamaConfig:
    """
    A two-layer Llama config with a sequence-dependent RoPE. `longrope`: short factors up to `switch_point` tokens,
    long ones beyond. `dynamic`: NTK scaling past `max_position_embeddings = switch_point`.
    """
    head_dim = 8
    config = {
        **TINY_DECODER,
        "max_position_embeddings": switch_point if rope_type == "dynamic" else 4 * switch_point,
        **_rope_config(rope_type, switch_point, head_dim, type_key="rope_type"),
        **overrides,
    }
    if rope_type == "longrope":
        config["original_max_position_embeddings"] = switch_point
        if Version("4.45") > TRANSFORMERS_VERSION:
            # 4.44's validation of longrope parameters fails without an explicit `attention_factor`
            config["rope_scaling"]["attention_factor"] = 1.0
    return LlamaConfig(**config)


def tiny_llama_model(
    rope_type: str = "longrope", seed: int = 0, attn_implementation: str = "eager", **overrides
) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama causal LM in eval mode (fp32, eager attention unless asked otherwise)."""
    torch.manual_seed(seed)
    config = tiny_llama_config(rope_type, attn_implementation=attn_implementation, **overrides)
    return LlamaForCausalLM(config).eval()


def reset_dynamic_rope(model) -> None:
    """
    Puts every dynamic NTK rotary embedding of `model` back in its initial state. Upstream's dynamic update remembers
    the longest sequence it has seen (until a sequence shorter than `max_position_embeddings` comes), so a forward
    pass depends on the ones before it; the no-cache reference is a forward pass of a fresh model.
    """
    for module in model.modules():
        if "dynamic" in str(getattr(module, "rope_type", "")) and hasattr(module, "original_inv_freq"):
            module.register_buffer("inv_freq", module.original_inv_freq.clone(), persistent=False)
            module.max_seq_len_cached = module.original_max_seq_len


def new_cache(kind: str, config, max_cache_len: int = 3 * SWITCH_POINT, device="cpu", dtype=torch.float32):
    """
    An empty `"dynamic"` or `"static"` cache for a model with `config`, built as the installed release wants it
    (releases that allocate a static cache up front take its `device` and `dtype`; later ones follow the first keys).
    """
    if kind == "dynamic":
        accepts_config = "config" in inspect.signature(DynamicCache.__init__).parameters
        return DynamicCache(config=config) if accepts_config else DynamicCache()
    parameters = inspect.signature(StaticCache.__init__).parameters
    if "max_batch_size" in parameters:
        device = {"device": device} if "device" in parameters else {}
        return StaticCache(config=config, max_batch_size=1, max_cache_len=max_cache_len, dtype=dtype, **device)
    return StaticCache(config=config, max_cache_len=max_cache_len)


def cached_keys_and_values(cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value tensors a cache holds for one layer (`layers` from 4.56, `key_cache` lists before)."""
    if hasattr(cache, "layers"):
        return cache.layers[layer_idx].keys, cache.layers[layer_idx].values
    return cache.key_cache[layer_idx], cache.value_cache[layer_idx]


def random_tokens(length: int, batch_size: int = 1, vocab_size: int = 97, seed: int = 0) -> torch.LongTensor:
    """Random token ids that avoid the special tokens 0-2 (pad, bos, eos)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch_size, length), generator=generator)


@torch.no_grad()
def no_cache_logits(model, input_ids, attention_mask=None) -> torch.Tensor:
    """Logits of the last token from a forward pass without cache over `input_ids`: the reference."""
    reset_dynamic_rope(model)
    position_ids = None
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
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
def cached_decoding_logits(model, input_ids, prompt_length: int) -> list[torch.Tensor]:
    """The logits of a prefill of `prompt_length` tokens, then of each further token fed alone through a cache."""
    cache = new_cache("dynamic", model.config)
    logits = [model(input_ids[:, :prompt_length], past_key_values=cache).logits]
    for position in range(prompt_length, input_ids.shape[1]):
        logits.append(model(input_ids[:, position : position + 1], past_key_values=cache).logits)
    return logits


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
def compiled_decode_step_errors(model, input_ids, prompt_length: int, max_cache_len: int, backend: str):
    """
    A hand-written loop whose decode steps run `torch.compile(model.forward, fullgraph=True, backend=backend)` over a
    static cache; the prompt is prefilled eagerly. The cache bookkeeping cannot run inside a graph, so the compiled
    steps leave the cache unrecorded: at the step whose sequence needs other frequencies, the loop feeds the whole
    sequence again, eagerly, through the emptied cache (the remedy `StaleRopeCacheError` names). Returns, for each
    sequence length after the prompt, the max |Δlogit| of the step against the forward pass without cache.
    """
    cache = new_cache("static", model.config, max_cache_len, device=model.device, dtype=model.dtype)
    takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters

    def forward(function, start: int, end: int):
        # Releases before 5.0 derive positions from `cache_position`, which `generate()` passes
        inputs = {"past_key_values": cache}
        if takes_cache_position:
            inputs["cache_position"] = torch.arange(start, end, device=model.device)
        return function(input_ids[:, start:end], **inputs).logits[:, -1]

    forward(model, 0, prompt_length)
    compiled_forward = torch.compile(model.forward, fullgraph=True, backend=backend)
    errors = {}
    for length in range(prompt_length + 1, input_ids.shape[1] + 1):
        if rope_frequency_regime(model.config, length) != rope_frequency_regime(model.config, length - 1):
            cache.reset()
            logits = forward(model, 0, length)
        else:
            logits = forward(compiled_forward, length - 1, length)
        reference = no_cache_logits(model, input_ids[:, :length])
        errors[length] = (logits.float() - reference.float()).abs().max().item()
    return errors


CONSISTENT_DECODING_AVAILABLE = Version("4.48") <= TRANSFORMERS_VERSION
"""`patches.apply(consistent=True)` needs the shared attention functions of 4.48 and later."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def left_padding_mask(batch_size: int, length: int) -> torch.LongTensor:
    """An attention mask whose rows after the first are left-padded by 3, 7 and 12 tokens."""
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    for row, padding in enumerate((0, 3, 7, 12)[:batch_size]):
        attention_mask[row, :padding] = 0
    return attention_mask


@torch.no_grad()
def bitwise_mismatches(model, input_ids, prompt_length: int, attention_mask=None, past_key_values=None) -> list[int]:
    """
    Feeds `input_ids[:, :prompt_length]` through a cache, then one token at a time, and returns the sequence lengths
    at which the decode step's logits differ in any bit from the forward pass without cache over the same tokens
    (same attention mask, same positions).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = past_key_values if past_key_values is not None else new_cache("dynamic", model.config)

    def inputs(start: int, end: int) -> dict:
        return {
            "input_ids": input_ids[:, start:end],
            "attention_mask": attention_mask[:, :end],
            "position_ids": positions[:, start:end],
        }

    model(**inputs(0, prompt_length), past_key_values=cache, use_cache=True)
    mismatches = []
    for length in range(prompt_length + 1, input_ids.shape[1] + 1):
        step_logits = model(**inputs(length - 1, length), past_key_values=cache, use_cache=True).logits[:, -1]
        reference = model(**inputs(0, length), use_cache=False).logits[:, -1]
        if not torch.equal(step_logits, reference):
            mismatches.append(length)
    return mismatches


@torch.no_grad()
def greedy_with_and_without_cache(model, input_ids, max_new_tokens: int, attention_mask=None):
    """Greedy `generate()` with a cache and with `use_cache=False`: both outputs (sequences and per-step logits)."""
    outputs = []
    for use_cache in (True, False):
        outputs.append(
            model.generate(
                input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=use_cache,
                pad_token_id=0,
                return_dict_in_generate=True,
                output_logits=True,
            )
        )
    return outputs


class LongRopeDecodingTesterMixin:
    """
    The decoding paths every longrope model is tested on across the switch, for a `unittest.TestCase` whose `setUp`
    builds `self.model` (a tiny longrope causal LM switching after `SWITCH_POINT` tokens): hand-written loops through
    a dynamic cache, a static cache and 3-token chunks, and greedy `generate()`, against the no-cache reference; and
    upstream's hand-written loop, stale.
    """

    def assertMatchesNoCache(self, errors):
        self.assertGreater(len(errors), 0)
        self.assertLessEqual(max(errors), FP32_TOLERANCE, f"max |Δlogit| per step: {errors}")

    def test_hand_written_loops_match_no_cache(self):
        for cache_kind, chunk_size in (("dynamic", 1), ("static", 1), ("dynamic", 3)):
            with self.subTest(cache=cache_kind, chunk_size=chunk_size), patches.applied():
                errors, _ = hand_written_loop_errors(
                    self.model,
                    random_tokens(SWITCH_POINT + 8),
                    SWITCH_POINT - 4,
                    past_key_values=new_cache(cache_kind, self.model.config),
                    chunk_size=chunk_size,
                )
                self.assertMatchesNoCache(errors)

    def test_hand_written_loop_with_the_deprecated_cache_keyword_matches_no_cache(self):
        if CACHE_KEYWORD == "past_key_values":
            self.skipTest("`past_key_values` is the cache keyword itself before 5.24, tested above")
        with patches.applied():
            errors, _ = hand_written_loop_errors(
                self.model,
                random_tokens(SWITCH_POINT + 4),
                SWITCH_POINT - 2,
                past_key_values=new_cache("dynamic", self.model.config),
                cache_keyword="past_key_values",
            )
        self.assertMatchesNoCache(errors)

    def test_upstream_hand_written_loop_is_stale(self):
        errors, _ = hand_written_loop_errors(self.model, random_tokens(SWITCH_POINT + 4), SWITCH_POINT - 2)
        self.assertGreater(max(errors), 0.1)

    def test_generate_matches_no_cache(self):
        with patches.applied():
            _, errors = generate_errors(self.model, random_tokens(SWITCH_POINT - 3), max_new_tokens=8, do_sample=False)
        self.assertMatchesNoCache(errors)
