"""
Tiny random models of every family the patches cover, with a RoPE switch after `SWITCH_POINT` tokens, built as the
installed transformers release wants them (config keys and cache constructors changed over the releases), and the
sizes of real checkpoints for random-weight models of their shape. The self-check (`python -m patches check`), the
demo, the scripts and the tests decode with them; nothing is downloaded.
"""

import importlib
import inspect

import torch
from packaging.version import Version

import transformers
from transformers import Cache, DynamicCache, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM, StaticCache

from .coverage import MODELS


TRANSFORMERS_VERSION = Version(transformers.__version__)

SWITCH_POINT = 32
"""`original_max_position_embeddings` of the tiny longrope models: sequences longer than this use the long factors."""


DYNAMIC_NTK_FACTOR = 2.0
"""`factor` of the tiny dynamic NTK models, whose frequencies change past `max_position_embeddings`."""


def rope_config(
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


PHI3_MINI_128K_SHAPE = {
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 131072,
}
"""Phi-3-mini-128k's sizes; it switches to the long factors after 4096 tokens."""

PHI3_MINI_SWITCH_POINT = 4096

LLAMA_7B_SHAPE = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
}
"""Llama-2-7B's sizes (a fixed RoPE: the model of the first background thread's divergence table)."""

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
    sizes too (the factors follow the head dimension); `longrope_factors` is `(short, long)` (see `rope_config`).
    """
    sizes = {**TINY_DECODER, **overrides}
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    config = {
        **TINY_DECODER,
        "max_position_embeddings": 4 * switch_point,
        # On 5.x the switch point must also be given at the top level, or it silently stays 4096
        "original_max_position_embeddings": switch_point,
        **rope_config(rope_type, switch_point, head_dim, longrope_factors=longrope_factors),
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


def tiny_llama_config(
    rope_type: str = "longrope",
    switch_point: int = SWITCH_POINT,
    config_class=LlamaConfig,
    rotary_dim: int = 8,
    extra_rope_parameters: dict | None = None,
    type_key: str = "rope_type",
    **overrides,
) -> LlamaConfig:
    """
    A two-layer Llama config (or one of `config_class`, a model of `patches.coverage.MODELS`) with a
    sequence-dependent RoPE. `longrope`: short factors up to `switch_point` tokens, long ones beyond (one per pair of
    the `rotary_dim` rotated dimensions). `dynamic`: NTK scaling past `max_position_embeddings = switch_point`.
    `extra_rope_parameters` go with the RoPE settings (`rope_parameters`, or `rope_scaling` before 5.0, whose type is
    under `type_key`) where these do not set them.
    """
    config = {
        **TINY_DECODER,
        "max_position_embeddings": switch_point if rope_type == "dynamic" else 4 * switch_point,
        **rope_config(rope_type, switch_point, rotary_dim, type_key=type_key),
        **overrides,
    }
    rope_arguments = config.get("rope_parameters") or config.get("rope_scaling")
    if extra_rope_parameters and rope_arguments is not None:
        for key, value in extra_rope_parameters.items():
            rope_arguments.setdefault(key, value)
    if rope_type == "longrope":
        config["original_max_position_embeddings"] = switch_point
        if Version("4.45") > TRANSFORMERS_VERSION:
            # 4.44's validation of longrope parameters fails without an explicit `attention_factor`
            config["rope_scaling"]["attention_factor"] = 1.0
    return config_class(**config)


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
    if "config" not in parameters:
        # 4.54-4.55: `StaticCache` passes its arguments on to `Cache.__init__`, whose layers want the batch size
        parameters = inspect.signature(Cache.__init__).parameters
    if "max_batch_size" in parameters:
        device = {"device": device} if "device" in parameters else {}
        return StaticCache(config=config, max_batch_size=1, max_cache_len=max_cache_len, dtype=dtype, **device)
    return StaticCache(config=config, max_cache_len=max_cache_len)


def random_tokens(length: int, batch_size: int = 1, vocab_size: int = 97, seed: int = 0) -> torch.LongTensor:
    """Random token ids that avoid the special tokens 0-2 (pad, bos, eos)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch_size, length), generator=generator)


STANDARD_FAMILY_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
"""Families whose config and causal LM take the sizes and RoPE settings of `tiny_llama_config` as they are."""


def tiny_standard_model(family: str, rope_type: str = "longrope", seed: int = 0, attn_implementation: str = "eager"):
    """A tiny Llama, Mistral or Qwen2 causal LM (`STANDARD_FAMILY_CLASSES`) with Llama's tiny settings."""
    prefix = STANDARD_FAMILY_CLASSES[family]
    config_class = getattr(transformers, f"{prefix}Config")
    causal_lm_class = getattr(transformers, f"{prefix}ForCausalLM")
    # Mistral's config defaults `head_dim` to None, which some releases' longrope init multiplies
    head_dim = TINY_DECODER["hidden_size"] // TINY_DECODER["num_attention_heads"]
    config = tiny_llama_config(
        rope_type, config_class=config_class, attn_implementation=attn_implementation, head_dim=head_dim
    )
    torch.manual_seed(seed)
    return causal_lm_class(config).eval()


TINY_IMAGE_SIZE = 28

TINY_PHI4_MULTIMODAL_ENCODERS = {
    "vision_config": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": 14,
        "crop_size": TINY_IMAGE_SIZE,
    },
    "audio_config": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_blocks": 1,
        "num_attention_heads": 2,
        "ext_pw_out_channel": 16,
        "depthwise_separable_out_channel": 16,
        "nemo_conv_channels": 16,
    },
}
"""Phi-4-multimodal's one-layer image and audio encoders."""


TINY_EXTRA_SETTINGS = {
    # Mixture of experts: four small experts, two per token, and (where a config has dense layers first) one dense
    # layer, then one with experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_k": 2,
    "moe_topk": 2,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "expert_ffn_hidden_size": 16,
    "ffn_hidden_size": 64,
    # Multi-head latent attention: the rotated part of a query or key head is `qk_rope_head_dim` wide
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "index_head_dim": 8,
    "index_n_heads": 2,
    # Linear-attention layers of hybrid models
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_head_dim": 8,
    # Head sizes under other names
    "query_pre_attn_scalar": 8,
    "kv_channels": 8,
}
"""Small settings for what some configs of `patches.coverage.MODELS` add to `TINY_DECODER` (experts,
latent attention, linear-attention layers), each given only to a config that has it."""

TINY_MODEL_SETTINGS = {
    # Hybrid models: one layer of each kind, so that one layer attends with RoPE
    "bailing_hybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # Only its sliding-window layers are rotary
    "flint": {"layer_types": ["sliding_attention", "full_attention"]},
    # A quarter of a head of 8 is one pair of dimensions, too few for dynamic NTK's exponent (dim / (dim - 2)): half
    "stablelm": {"partial_rotary_factor": 0.5},
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"], "partial_rotary_factor": 0.5},
    # Its head dimension is the rotated part of latent attention's heads, but not derived from it
    "longcat_flash": {"head_dim": 8},
    "phi4_multimodal": TINY_PHI4_MULTIMODAL_ENCODERS,
    # Its attention and experts are sub-configs, which read the hidden size under its own name
    "dbrx": {
        "d_model": TINY_DECODER["hidden_size"],
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
    },
}
"""Per-model settings of `tiny_config` beyond `TINY_DECODER` and `TINY_EXTRA_SETTINGS`."""

TINY_MODEL_ROPE_PARAMETERS = {
    # Their attention scales queries by position with these (Llama 4's scaling), as their checkpoints give them
    "ministral3": {"llama_4_scaling_beta": 0.1, "original_max_position_embeddings": SWITCH_POINT},
    "mistral4": {"llama_4_scaling_beta": 0.1, "original_max_position_embeddings": SWITCH_POINT},
    # Their 4.x rotary embeddings read `alpha` (NTK-alpha scaling of the base) with dynamic NTK; 1 changes nothing
    "hunyuan_v1_dense": {"alpha": 1.0},
    "hunyuan_v1_moe": {"alpha": 1.0},
    # Their 4.x attention reads `factor` (for yarn's attention scale) whatever the RoPE type; 1 changes nothing
    "deepseek_v3": {"factor": 1.0},
    "longcat_flash": {"factor": 1.0},
}
"""Per-model RoPE parameters of `tiny_config` beyond those of `rope_config` (which keep their own values)."""

TINY_MODEL_ROPE_TYPE_KEYS = {"olmo": "type", "olmo2": "type", "phi4_multimodal": "type"}
"""Models whose 4.x configs read the RoPE type under `type` rather than `rope_type`."""


def _standard_rope_classes(module_name: str) -> tuple[type, type, type]:
    """The rotary embedding, causal LM and config classes of a model of `coverage.MODELS`."""
    prefix = MODELS[module_name].prefix
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    causal_lm_class = getattr(module, f"{prefix}ForCausalLM")
    return getattr(module, f"{prefix}RotaryEmbedding"), causal_lm_class, causal_lm_class.config_class


def _rotary_dim(config) -> int:
    """How many dimensions of a head the longrope and dynamic NTK inits rotate, as they compute it."""
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    partial_rotary_factor = rope_parameters.get("partial_rotary_factor") or getattr(
        config, "partial_rotary_factor", None
    )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * (partial_rotary_factor or 1.0))


def tiny_config(module_name: str, rope_type: str = "longrope", attn_implementation: str = "eager", **overrides):
    """
    A two-layer config of a model of `patches.coverage.MODELS`, with `TINY_DECODER`'s sizes, a head
    dimension of 8, the small settings of `TINY_EXTRA_SETTINGS` it has, and the RoPE settings of `tiny_llama_config`
    (`longrope`: short factors up to `SWITCH_POINT` tokens, long ones beyond; `dynamic`: NTK scaling past
    `max_position_embeddings = SWITCH_POINT`). The longrope factors have as many entries as the rotary embedding has
    frequencies (fewer than the head dimension's half where a model rotates only part of each head).
    """
    rotary_class, _, config_class = _standard_rope_classes(module_name)
    defaults = config_class()
    sizes = {
        **TINY_DECODER,
        **{key: value for key, value in TINY_EXTRA_SETTINGS.items() if hasattr(defaults, key)},
        "head_dim": TINY_DECODER["hidden_size"] // TINY_DECODER["num_attention_heads"],
        "attn_implementation": attn_implementation,
    }
    if hasattr(defaults, "kv_lora_rank"):
        # Latent attention expands its keys and values to every head, and its config derives the head dimension
        # from `qk_rope_head_dim` and `qk_nope_head_dim`
        sizes["num_key_value_heads"] = sizes["num_attention_heads"]
        sizes.pop("head_dim")
    sizes.update({**TINY_MODEL_SETTINGS.get(module_name, {}), **overrides})
    rotary_dim = _rotary_dim(tiny_llama_config("default", config_class=config_class, **sizes))
    return tiny_llama_config(
        rope_type,
        config_class=config_class,
        rotary_dim=rotary_dim,
        extra_rope_parameters=TINY_MODEL_ROPE_PARAMETERS.get(module_name),
        type_key=TINY_MODEL_ROPE_TYPE_KEYS.get(module_name, "rope_type"),
        **sizes,
    )


def tiny_model(module_name: str, rope_type: str = "longrope", seed: int = 0, attn_implementation: str = "eager"):
    """A randomly initialised causal LM of `tiny_config`, in eval mode (fp32, eager attention unless asked so)."""
    _, causal_lm_class, _ = _standard_rope_classes(module_name)
    config = tiny_config(module_name, rope_type, attn_implementation)
    torch.manual_seed(seed)
    return causal_lm_class(config).eval()


SHORT_MSCALE, LONG_MSCALE = 1.0, 1.25
"""PhiMoE's longrope attention scales, short and long, as its checkpoints have them (apart, so a mix-up shows)."""


def tiny_phimoe_model(seed: int = 0):
    """A two-layer, two-expert PhiMoE whose longrope factors and scale switch after `SWITCH_POINT` tokens (4.46+)."""
    from transformers import PhimoeConfig, PhimoeForCausalLM

    head_dim = TINY_DECODER["hidden_size"] // TINY_DECODER["num_attention_heads"]
    rope_settings = {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.25 * i for i in range(head_dim // 2)],
        "long_factor": [4.0 + 2.0 * i for i in range(head_dim // 2)],
        "short_mscale": SHORT_MSCALE,
        "long_mscale": LONG_MSCALE,
        "original_max_position_embeddings": SWITCH_POINT,
    }
    if TRANSFORMERS_VERSION.major >= 5:
        rope_arguments = {"rope_parameters": {**rope_settings, "rope_theta": 10000.0}}
    else:
        rope_arguments = {"rope_scaling": rope_settings, "rope_theta": 10000.0}
    config = PhimoeConfig(
        **TINY_DECODER,
        num_local_experts=2,
        num_experts_per_tok=2,
        max_position_embeddings=4 * SWITCH_POINT,
        original_max_position_embeddings=SWITCH_POINT,
        **rope_arguments,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return PhimoeForCausalLM(config).eval()


def tiny_phi4_multimodal_model(seed: int = 0):
    """A two-layer Phi-4-multimodal with one-layer image and audio encoders; longrope switches after `SWITCH_POINT`
    (4.51+)."""
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    head_dim = TINY_DECODER["hidden_size"] // TINY_DECODER["num_attention_heads"]
    config = Phi4MultimodalConfig(
        **TINY_DECODER,
        **rope_config("longrope", SWITCH_POINT, head_dim),
        max_position_embeddings=4 * SWITCH_POINT,
        original_max_position_embeddings=SWITCH_POINT,
        **TINY_PHI4_MULTIMODAL_ENCODERS,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return Phi4MultimodalForCausalLM(config).eval()
