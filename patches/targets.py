"""
The attributes of the installed transformers that the patches replace, and what replaces them.

Upstream's Phi-3 longrope code took four shapes over the supported releases. The bindings recognise each shape by
what the installed classes define, and every replaced function is checked (signature and source fingerprint) against
the one its replacement was written for; a function that differs is refused, not patched blind.

| releases  | factors chosen in                                      | replaced                                    |
|-----------|--------------------------------------------------------|---------------------------------------------|
| 4.44-4.47 | `Phi3LongRoPEScaledRotaryEmbedding.forward`, per layer | that `forward`; the causal LM's forward     |
|           |                                                        | warning (4.45-4.47)                         |
| 4.48-4.50 | `Phi3RotaryEmbedding._longrope_frequency_update`       | `forward`, in its 4.51 form (decorated)     |
| 4.51-5.x  | the `dynamic_rope_update` decorator on `forward`       | `forward`, re-decorated                     |

In every release, `Phi3Model.forward` is decorated with `check_rope_cache`, and the causal LM's
`prepare_inputs_for_generation` with `check_rope_cache_in_generation`; from 4.45 on, that decorates the generic
implementation instead of Phi-3's own, whose only addition is dropping the cache at the switch. The same decorators
go on PhiMoE, Phi-4-multimodal and the models of `STANDARD_ROPE_MODELS`.

With `consistent=True`, `consistent_decoding_bindings` also replaces `torch.nn.Linear.forward` and, in the modeling
modules of `CONSISTENT_DECODING_MODELS`, `eager_attention_forward` and `ALL_ATTENTION_FUNCTIONS` (module attributes).
"""

import inspect
from collections.abc import Callable
from functools import partial

import torch

from modeling_overrides import modeling_rope_utils
from modeling_overrides.rope_cache_utils import (
    check_rope_cache,
    check_rope_cache_in_generation,
    split_at_rope_switch,
)

from .binding import (
    Binding,
    all_checks,
    expect_parameters,
    expect_source,
    original_attribute,
    parameter_names,
    source,
)


DECODER_FORWARD_LEADING_PARAMETERS = [
    "self",
    "input_ids",
    "attention_mask",
    "position_ids",
    "past_key_values",
    "inputs_embeds",
    "use_cache",
]
V4_44_PREPARE_INPUTS_PARAMETERS = [
    "self",
    "input_ids",
    "past_key_values",
    "attention_mask",
    "inputs_embeds",
    "cache_position",
    "position_ids",
    "use_cache",
    "kwargs",
]
V4_46_CAUSAL_LM_FORWARD_PARAMETERS = [
    *DECODER_FORWARD_LEADING_PARAMETERS[:-1],
    "labels",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "cache_position",
    "num_logits_to_keep",
    "loss_kwargs",
]
V4_46_SWITCH_WARNING = "you may encounter nonsensical outputs"

UpstreamAttribute = Callable[[type, str], object]


def _source(function) -> str:
    try:
        return source(function)
    except (OSError, TypeError):
        return ""


def _inherited_attribute(owner: type, attribute: str):
    """The attribute `owner` would have without its own definition: what `super()` resolves to."""
    return next(base.__dict__[attribute] for base in owner.__mro__[1:] if attribute in base.__dict__)


def _rotary_forward_check(original) -> str | None:
    if original is None:
        return "the class does not define it"
    if not hasattr(original, "__wrapped__"):
        return "it is not wrapped by `dynamic_rope_update`, as the releases this patch targets have it"
    found = list(inspect.signature(inspect.unwrap(original)).parameters)
    if found != ["self", "x", "position_ids"]:
        return f"its signature changed: expected parameters ['self', 'x', 'position_ids'], found {found}"
    return None


def _rotary_forward_replacement(original):
    # `forward` is decorated when its class is defined, so the decorator is re-applied to the undecorated function
    return torch.no_grad()(modeling_rope_utils.dynamic_rope_update(inspect.unwrap(original)))


def _forward_check(required: list[str]):
    """A check for a forward pass whose parameters start like `DECODER_FORWARD_LEADING_PARAMETERS` and include
    `required` further on (the order of the later ones varies between releases). From 5.24 the cache parameter is
    named `cache` (`past_key_values` is its deprecated alias)."""
    leading = DECODER_FORWARD_LEADING_PARAMETERS[:-1]
    leading_from_5_24 = [name if name != "past_key_values" else "cache" for name in leading]

    def check(original) -> str | None:
        if original is None:
            return "the class does not define it"
        found = list(inspect.signature(inspect.unwrap(original)).parameters)
        missing = [name for name in required if name not in found]
        if found[: len(leading)] not in (leading, leading_from_5_24) or missing:
            return f"its signature changed: expected parameters starting with {leading} and with {required}, found {found}"
        return None

    return check


_decoder_forward_check = _forward_check(["use_cache"])
_causal_lm_forward_check = _forward_check(["labels", "use_cache"])


def phi3_rotary_bindings(modeling_phi3) -> list[Binding]:
    """The longrope frequency update, in whichever place the installed release makes it."""
    if hasattr(modeling_phi3, "Phi3LongRoPEScaledRotaryEmbedding"):
        from modeling_overrides.models.phi3 import modeling_phi3_v4_46

        return [
            Binding(
                name="Phi3LongRoPEScaledRotaryEmbedding.forward",
                owner=modeling_phi3.Phi3LongRoPEScaledRotaryEmbedding,
                attribute="forward",
                replacement=lambda original: modeling_phi3_v4_46.Phi3LongRoPEScaledRotaryEmbedding.forward,
                check=all_checks(
                    expect_parameters(["self", "x", "position_ids", "seq_len"]),
                    expect_source("torch.max(position_ids) + 1", "self.long_factor", "self.short_factor"),
                ),
            )
        ]
    rotary_embedding = modeling_phi3.Phi3RotaryEmbedding
    if "_longrope_frequency_update" in rotary_embedding.__dict__:
        # 4.48 to 4.50: `forward` calls the update methods, then rotates with `inv_freq`; it becomes the 4.51 form,
        # whose update (for the batch or for each row) is the `dynamic_rope_update` decorator's
        from modeling_overrides.models.phi3 import modeling_phi3_v4_50

        return [
            Binding(
                name="Phi3RotaryEmbedding.forward",
                owner=rotary_embedding,
                attribute="forward",
                replacement=lambda original: modeling_phi3_v4_50.Phi3RotaryEmbedding.forward,
                check=all_checks(
                    expect_parameters(["self", "x", "position_ids"]),
                    expect_source(
                        "self._longrope_frequency_update(position_ids", "cos = cos * self.attention_scaling"
                    ),
                ),
            )
        ]
    return [
        Binding(
            name="Phi3RotaryEmbedding.forward",
            owner=rotary_embedding,
            attribute="forward",
            replacement=_rotary_forward_replacement,
            check=_rotary_forward_check,
        )
    ]


def _generation_binding(causal_lm: type, upstream_attribute: UpstreamAttribute, frequencies_per_row: bool) -> Binding:
    """`prepare_inputs_for_generation`, decorated: the class's own, or the generic one in place of a cache drop."""
    name = f"{causal_lm.__name__}.prepare_inputs_for_generation"
    own = upstream_attribute(causal_lm, "prepare_inputs_for_generation")
    if own is None or "original_max_position_embeddings" in _source(own):
        # Inherited, or (Phi-3 and PhiMoE from 4.45) an override that only drops the cache at the switch and then
        # calls the generic version: the generic version is decorated, and the drop goes
        def check(original) -> str | None:
            if original is None:
                return None
            # The cache argument is `cache` from 5.24, `past_key_values` before
            cache_name = "cache" if "cache" in parameter_names(original) else "past_key_values"
            return expect_source(f"{cache_name} = None", "super().prepare_inputs_for_generation(")(original)

        return Binding(
            name=name,
            owner=causal_lm,
            attribute="prepare_inputs_for_generation",
            replacement=lambda original: check_rope_cache_in_generation(
                _inherited_attribute(causal_lm, "prepare_inputs_for_generation"),
                frequencies_per_row=frequencies_per_row,
            ),
            check=check,
        )
    # Releases before 4.46 give each model a complete version of its own
    return Binding(
        name=name,
        owner=causal_lm,
        attribute="prepare_inputs_for_generation",
        replacement=partial(check_rope_cache_in_generation, frequencies_per_row=frequencies_per_row),
        check=all_checks(
            expect_parameters(V4_44_PREPARE_INPUTS_PARAMETERS), expect_source("input_ids[:, cache_position]")
        ),
    )


def cache_bindings(
    decoder: type, causal_lm: type, upstream_attribute: UpstreamAttribute, frequencies_per_row: bool = True
) -> list[Binding]:
    """
    The stale-cache policy in a decoder model, its causal LM and `generate()`. `frequencies_per_row` is `False` for a
    model whose rotary embedding chooses the frequencies of the whole batch by the cache index (see
    `check_rope_cache`).
    """
    bindings = [
        Binding(
            name=f"{decoder.__name__}.forward",
            owner=decoder,
            attribute="forward",
            replacement=partial(check_rope_cache, frequencies_per_row=frequencies_per_row),
            check=_decoder_forward_check,
        ),
        _generation_binding(causal_lm, upstream_attribute, frequencies_per_row),
    ]
    causal_lm_forward = upstream_attribute(causal_lm, "forward")
    if causal_lm.__name__ == "Phi3ForCausalLM" and V4_46_SWITCH_WARNING in _source(causal_lm_forward):
        # 4.45 to 4.47: the forward pass also warns at the switch, with a device->host synchronisation at every step
        from modeling_overrides.models.phi3 import modeling_phi3_v4_46

        bindings.append(
            Binding(
                name="Phi3ForCausalLM.forward",
                owner=causal_lm,
                attribute="forward",
                replacement=lambda original: split_at_rope_switch(modeling_phi3_v4_46.Phi3ForCausalLM.forward),
                check=all_checks(
                    expect_parameters(V4_46_CAUSAL_LM_FORWARD_PARAMETERS),
                    expect_source(V4_46_SWITCH_WARNING, "self.lm_head(hidden_states[:, -num_logits_to_keep:, :])"),
                ),
            )
        )
    else:
        bindings.append(
            Binding(
                name=f"{causal_lm.__name__}.forward",
                owner=causal_lm,
                attribute="forward",
                replacement=partial(split_at_rope_switch, frequencies_per_row=frequencies_per_row),
                check=_causal_lm_forward_check,
            )
        )
    return bindings


def _tracks_any_cache(stale_cache_policy: dict[str, str]) -> bool:
    # With "ignore" for every type, models keep upstream's own handling of their caches
    return any(policy != "ignore" for policy in stale_cache_policy.values())


def phi3_bindings(stale_cache_policy: dict[str, str], upstream_attribute: UpstreamAttribute) -> list[Binding]:
    """Bindings for Phi-3: its longrope frequency update, and its cache handling unless its caches are ignored."""
    from transformers.models.phi3 import modeling_phi3

    bindings = phi3_rotary_bindings(modeling_phi3)
    if _tracks_any_cache(stale_cache_policy):
        bindings += cache_bindings(modeling_phi3.Phi3Model, modeling_phi3.Phi3ForCausalLM, upstream_attribute)
    return bindings


STANDARD_ROPE_MODELS = {
    "apertus": "Apertus",
    "apertus1p5": "Apertus1p5Text",
    "arcee": "Arcee",
    "aria": "AriaText",
    "axk1": "AXK1",
    "axk2": "AXK2",
    "bailing_hybrid": "BailingHybrid",
    "bitnet": "BitNet",
    "cohere": "Cohere",
    "cohere2": "Cohere2",
    "cohere2_moe": "Cohere2Moe",
    "cwm": "Cwm",
    "dbrx": "Dbrx",
    "deepseek_v2": "DeepseekV2",
    "deepseek_v3": "DeepseekV3",
    "deepseek_v32": "DeepseekV32",
    "diffllama": "DiffLlama",
    "doge": "Doge",
    "dots1": "Dots1",
    "ernie4_5": "Ernie4_5",
    "ernie4_5_moe": "Ernie4_5_Moe",
    "exaone4": "Exaone4",
    "exaone_moe": "ExaoneMoe",
    "flex_olmo": "FlexOlmo",
    "flint": "Flint",
    "gemma": "Gemma",
    "gemma2": "Gemma2",
    "glm": "Glm",
    "glm4": "Glm4",
    "glm4_moe": "Glm4Moe",
    "glm4_moe_lite": "Glm4MoeLite",
    "glm_moe_dsa": "GlmMoeDsa",
    "gpt_oss": "GptOss",
    "granite": "Granite",
    "granite_swa": "GraniteSWA",
    "helium": "Helium",
    "hunyuan_v1_dense": "HunYuanDenseV1",
    "hunyuan_v1_moe": "HunYuanMoEV1",
    "hy_v3": "HYV3",
    "hy_v4": "HYV4",
    "hyperclovax": "HyperCLOVAX",
    "jais2": "Jais2",
    "jetmoe": "JetMoe",
    "kolibri1": "Kolibri1",
    "lara_mini": "LaraMini",
    "lfm2": "Lfm2",
    "lfm2_moe": "Lfm2Moe",
    "llama": "Llama",
    "longcat_flash": "LongcatFlash",
    "minicpm3": "MiniCPM3",
    "minimax_m2": "MiniMaxM2",
    "ministral": "Ministral",
    "ministral3": "Ministral3",
    "mistral": "Mistral",
    "mistral4": "Mistral4",
    "mixtral": "Mixtral",
    "moshi": "Moshi",
    "nanochat": "NanoChat",
    "nemotron": "Nemotron",
    "olmo": "Olmo",
    "olmo2": "Olmo2",
    "olmo_hybrid": "OlmoHybrid",
    "olmoe": "Olmoe",
    "persimmon": "Persimmon",
    "phi": "Phi",
    "phi4_multimodal": "Phi4Multimodal",
    "qwen2": "Qwen2",
    "qwen2_moe": "Qwen2Moe",
    "qwen3": "Qwen3",
    "qwen3_moe": "Qwen3Moe",
    "qwen3_next": "Qwen3Next",
    "seed_oss": "SeedOss",
    "smollm3": "SmolLM3",
    "solar_open": "SolarOpen",
    "stablelm": "StableLm",
    "starcoder2": "Starcoder2",
    "vaultgemma": "VaultGemma",
    "youtu": "Youtu",
}
"""
The models with the standard rotary embedding (`XxxRotaryEmbedding(config)`, any `rope_type`, rotating with
`inv_freq`, `forward(self, x, position_ids)`), by modeling module and class prefix (`XxxRotaryEmbedding`, `XxxModel`,
`XxxForCausalLM`). A config may give any of them longrope or dynamic NTK (MiniCPM3's checkpoints use longrope), and
upstream keeps their caches for neither (Phi-4-multimodal, from 4.51, is longrope and drops the cache at the switch in
`generate()` only, as Phi-3 does). Each one's bindings pass on every tested release that has it
(`patches/versions.py`), and `tests/models/test_standard_rope_models.py` decodes a tiny one of each across the switch.
A release leaves a model out (`covered_standard_rope_model`) when it does not have it, when its rotary embedding
takes no RoPE type from the config (Mistral and Qwen2 before 4.45), when the model has a cache class of its own
(LFM2 and Qwen3-Next before 5.0: the recompute empties transformers' caches in place, not their convolution and
recurrent states), or before the release of `COVERED_FROM`. Phi-3 and PhiMoE have rotary embeddings of their own
(`phi3_bindings`, `phimoe_bindings`).
"""

COVERED_FROM = {
    "cohere2": (
        "4.57",
        "on 4.50 its causal LM has its own `prepare_inputs_for_generation` (for a `HybridCache`), which the bindings "
        "refuse",
    ),
    "gemma2": (
        "4.57",
        "on 4.50 its causal LM has its own `prepare_inputs_for_generation` (for a `HybridCache`), which the bindings "
        "refuse",
    ),
    "moshi": (
        "5.0",
        "before 5.0 its cached decoding differs from decoding without cache whatever the RoPE (max |Δlogit| 1.6e-2 "
        "with the default one on 4.57), so that nothing can check the patches on it",
    ),
}
"""Models of `STANDARD_ROPE_MODELS` covered only from a release on, and why not before: each fails on the newest tested
release before it (4.50 or 4.57) and passes on every tested one from it."""

LEFT_OUT_MODELS = {
    "bamba": "refused on 5.23 and 5.24: its causal LM's own `prepare_inputs_for_generation` (Mamba states) is not "
    "the one the generation check wraps",
    "deepseek_v4": "its rotary `forward` takes a layer type (RoPE parameters per kind of layer)",
    "emu3": "its decoder is `Emu3TextModel`, under `Emu3ForCausalLM`, and `Emu3Model` is the multimodal model, whose "
    "`forward` takes other parameters",
    "falcon_h1": "refused on 5.23 and 5.24: its causal LM's own `prepare_inputs_for_generation` (Mamba states) is "
    "not the one the generation check wraps",
    "granitemoe": "refused on 5.23 and 5.24: its causal LM's `forward` has no `use_cache` parameter",
    "granitemoehybrid": "refused on 5.23 and 5.24: its causal LM's `forward` has no `use_cache` parameter",
    "granitemoeshared": "refused on 5.23 and 5.24: its causal LM's `forward` has no `use_cache` parameter",
    "minimax": "its cache (`MiniMaxCache`) keeps the lightning-attention states in `linear_cache`, which the "
    "recompute's in-place reset does not empty: recomputed decoding stays wrong (max |Δlogit| 0.5 on a tiny model)",
    "minimax_m3_vl": "its decoder `MiniMaxM3VLModel` is the multimodal model, whose `forward` takes other parameters",
    "modernbert_decoder": "on 5.23 and 5.24 its rotary `forward` takes a layer type (RoPE parameters per kind of "
    "layer)",
    "olmo3": "on 5.23 and 5.24 its rotary `forward` takes a layer type (RoPE parameters per kind of layer)",
    "voxtral_realtime": "its decoder is `VoxtralRealtimeTextModel`, under a `VoxtralRealtimeForConditionalGeneration`",
    "zamba2": "refused on 5.23 and 5.24: its causal LM's own `prepare_inputs_for_generation` (Mamba states) is not "
    "the one the generation check wraps",
}
"""Models with a standard-looking rotary embedding that `STANDARD_ROPE_MODELS` leaves out, and why: the bindings
would be refused on some tested release (and `apply()` refuses as a whole), or the model does not have the shape they
are written for, or the recompute is wrong for it. Upstream keeps their caches stale across a switch."""


def _standard_rotary_binding(rotary_embedding: type) -> Binding:
    def check(original) -> str | None:
        if original is None:
            return "the class does not define it"
        found = list(inspect.signature(inspect.unwrap(original)).parameters)
        if found != ["self", "x", "position_ids"]:
            return f"its signature changed: expected parameters ['self', 'x', 'position_ids'], found {found}"
        return expect_source("self.inv_freq")(original)

    return Binding(
        name=f"{rotary_embedding.__name__}.forward",
        owner=rotary_embedding,
        attribute="forward",
        # Before 4.51 `forward` makes only the dynamic update itself: decorating it adds the longrope one (the dynamic
        # one then runs twice, the second time without effect)
        replacement=_rotary_forward_replacement,
        check=check,
    )


def standard_rope_model_exclusion(
    module_name: str, release: str, rotary_init_source: str, own_caches: list[str]
) -> str | None:
    """
    Why the patches leave `module_name`, a model of `STANDARD_ROPE_MODELS`, out on transformers `release`, or `None`
    when they cover it: its rotary embedding takes no RoPE type from the config (`rotary_init_source`, the source of
    its `__init__`: Mistral and Qwen2 before 4.45 have no `rope_type`, Nemotron before 5.0 one always `"default"`), it
    has cache classes of its own (`own_caches`), or `release` is older than the one `COVERED_FROM` gives. The
    run-time patches and the pull request (`upstream_pr/plan.py`) decide alike.
    """
    from packaging.version import Version

    prefix = STANDARD_ROPE_MODELS[module_name]
    if "rope_type" not in rotary_init_source or not any(
        name in rotary_init_source for name in ("rope_scaling", "rope_parameters")
    ):
        return f"in transformers {release}, {prefix}RotaryEmbedding takes no RoPE type from the config"
    if own_caches:
        return (
            f"in transformers {release}, {module_name} has its own cache ({', '.join(own_caches)}), whose states the "
            "recompute does not empty"
        )
    if module_name in COVERED_FROM and Version(COVERED_FROM[module_name][0]) > Version(Version(release).base_version):
        first, reason = COVERED_FROM[module_name]
        return f"covered from transformers {first}: {reason}"
    return None


def covered_standard_rope_model(module_name: str):
    """
    `(module, None)`, the installed release's modeling module of `module_name` (a model of `STANDARD_ROPE_MODELS`)
    when the patches cover it there, or `(None, why not)`: the release does not have the model (or not its rotary
    embedding, decoder and causal LM), or `standard_rope_model_exclusion` leaves it out.
    """
    import importlib

    import transformers

    prefix = STANDARD_ROPE_MODELS[module_name]
    release = transformers.__version__
    try:
        module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    except ImportError:
        return None, f"transformers {release} does not have {module_name}"
    missing = [
        prefix + suffix
        for suffix in ("RotaryEmbedding", "Model", "ForCausalLM")
        if not hasattr(module, prefix + suffix)
    ]
    if missing:
        return None, f"transformers {release} has no {', '.join(missing)}"
    own_caches = [
        name
        for name, value in vars(module).items()
        if isinstance(value, type) and name.endswith("Cache") and value.__module__ == module.__name__
    ]
    rotary_init_source = _source(getattr(module, f"{prefix}RotaryEmbedding").__init__)
    reason = standard_rope_model_exclusion(module_name, release, rotary_init_source, own_caches)
    return (None, reason) if reason is not None else (module, None)


def left_out_models() -> dict[str, str]:
    """
    The models of the installed release that have a standard-looking rotary embedding but are not protected, with
    why: those of `LEFT_OUT_MODELS`, and those of `STANDARD_ROPE_MODELS` that `covered_standard_rope_model` leaves
    out on this release. A config with `longrope` or `dynamic` scaling keeps their caches stale across a switch, as
    upstream does. Models the release does not have are not listed.
    """
    import importlib.util

    left_out = {}
    for module_name in STANDARD_ROPE_MODELS:
        module, reason = covered_standard_rope_model(module_name)
        if module is None and "does not have" not in reason:
            left_out[module_name] = reason
    for module_name, reason in LEFT_OUT_MODELS.items():
        if importlib.util.find_spec(f"transformers.models.{module_name}") is not None:
            left_out[module_name] = reason
    return dict(sorted(left_out.items()))


def standard_rope_model_bindings(
    stale_cache_policy: dict[str, str], upstream_attribute: UpstreamAttribute
) -> list[Binding]:
    """Bindings for the models of `STANDARD_ROPE_MODELS` that the installed release has and the patches cover there
    (`covered_standard_rope_model`)."""
    bindings = []
    for module_name, prefix in STANDARD_ROPE_MODELS.items():
        module, _ = covered_standard_rope_model(module_name)
        if module is None:
            continue
        bindings.append(_standard_rotary_binding(getattr(module, f"{prefix}RotaryEmbedding")))
        if _tracks_any_cache(stale_cache_policy):
            decoder, causal_lm = getattr(module, f"{prefix}Model"), getattr(module, f"{prefix}ForCausalLM")
            bindings += cache_bindings(decoder, causal_lm, upstream_attribute)
    return bindings


def phimoe_bindings(stale_cache_policy: dict[str, str], upstream_attribute: UpstreamAttribute) -> list[Binding]:
    """
    Bindings for PhiMoE, whose rotary embedding took two shapes:

    - 4.46 to 4.57: `forward(x, seq_len)` builds a table for the batch's first `seq_len` positions, choosing the
      factors by `seq_len` with a device->host synchronisation (and, before 4.51, one token early). It is called
      without positions, so the choice stays batch-wide; the caches follow that (`frequencies_per_row=False`).
    - 5.x: `forward(x, position_ids)` recomputes the short frequencies at every call, so it never switches to the
      long ones, and picks its scale with a device->host synchronisation.
    """
    try:
        from transformers.models.phimoe import modeling_phimoe
    except ImportError:
        return []
    rotary_embedding = modeling_phimoe.PhimoeRotaryEmbedding
    rotary_forward = upstream_attribute(rotary_embedding, "forward")
    frequencies_per_row = "position_ids" in inspect.signature(rotary_forward).parameters
    if frequencies_per_row:
        from modeling_overrides.models.phimoe import modeling_phimoe as phimoe_overrides

        expected_parameters = ["self", "x", "position_ids"]
        fingerprint = ("self.rope_init_fn(self.config)", "long_mscale", "short_mscale")
    else:
        from modeling_overrides.models.phimoe import modeling_phimoe_v4_57 as phimoe_overrides

        expected_parameters = ["self", "x", "seq_len"]
        fingerprint = ("self.rope_init_fn(self.config, x.device, seq_len)", "long_mscale", "torch.arange(seq_len")
    rotary_binding = Binding(
        name="PhimoeRotaryEmbedding.forward",
        owner=rotary_embedding,
        attribute="forward",
        replacement=lambda original: phimoe_overrides.PhimoeRotaryEmbedding.forward,
        check=all_checks(expect_parameters(expected_parameters), expect_source(*fingerprint)),
    )
    bindings = [rotary_binding]
    if _tracks_any_cache(stale_cache_policy):
        bindings += cache_bindings(
            modeling_phimoe.PhimoeModel, modeling_phimoe.PhimoeForCausalLM, upstream_attribute, frequencies_per_row
        )
    return bindings


CONSISTENT_DECODING_MODELS = ("llama", "mistral", "qwen2", "phi3", "phimoe", "phi4_multimodal")
"""Models whose attention `consistent=True` makes batch-invariant: the Llama and Phi-3 families."""

EAGER_ATTENTION_PARAMETERS = ["module", "query", "key", "value", "attention_mask", "scaling", "dropout", "kwargs"]


def _attention_functions_with_consistent_sdpa(original):
    """A copy of a modeling module's `ALL_ATTENTION_FUNCTIONS` whose `"sdpa"` is the consistent attention."""
    from modeling_overrides.integrations.consistent_decoding import consistent_attention_forward

    if isinstance(original, dict):  # before 4.51
        return {**original, "sdpa": consistent_attention_forward}
    functions = type(original)()
    functions["sdpa"] = consistent_attention_forward  # a local entry, which takes precedence over the global ones
    return functions


def consistent_decoding_bindings() -> list[Binding]:
    """
    The bindings of `consistent=True`: every `nn.Linear` computes over fixed row tiles, and the attention of the
    Llama and Phi-3 families (requested as `"eager"` or `"sdpa"`) over fixed query tiles and key blocks. Empty when
    the installed release does not share attention functions through `ALL_ATTENTION_FUNCTIONS` (before 4.48).
    """
    import importlib

    from modeling_overrides.integrations import consistent_decoding

    bindings = []
    for module_name in CONSISTENT_DECODING_MODELS:
        try:
            module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
        except ImportError:
            continue
        if not hasattr(module, "eager_attention_forward") or not hasattr(module, "ALL_ATTENTION_FUNCTIONS"):
            continue
        bindings += [
            Binding(
                name=f"modeling_{module_name}.eager_attention_forward",
                owner=module,
                attribute="eager_attention_forward",
                replacement=lambda original: consistent_decoding.consistent_attention_forward,
                check=expect_parameters(EAGER_ATTENTION_PARAMETERS),
            ),
            Binding(
                name=f"modeling_{module_name}.ALL_ATTENTION_FUNCTIONS",
                owner=module,
                attribute="ALL_ATTENTION_FUNCTIONS",
                replacement=_attention_functions_with_consistent_sdpa,
                check=lambda original: None if "sdpa" in original else "it has no `sdpa` entry",
            ),
        ]
    if not bindings:
        return []
    bindings.append(
        Binding(
            name="torch.nn.Linear.forward",
            owner=torch.nn.Linear,
            attribute="forward",
            replacement=lambda original: consistent_decoding.Linear.forward,
            check=expect_parameters(["self", "input"]),
        )
    )
    return bindings


def all_bindings(
    stale_cache_policy: dict[str, str],
    upstream_attribute: UpstreamAttribute = original_attribute,
    consistent: bool = False,
) -> list[Binding]:
    """
    Every binding the patches make on the installed transformers, for the given stale-cache policy.

    Args:
        stale_cache_policy: the policy per RoPE type, as `normalize_stale_cache_policy` returns it.
        upstream_attribute: returns an attribute as upstream defines it (not as a previous `apply` replaced it), or
            `None` when the class only inherits it.
        consistent: add the bindings of `consistent_decoding_bindings`.
    """
    bindings = [
        *phi3_bindings(stale_cache_policy, upstream_attribute),
        *phimoe_bindings(stale_cache_policy, upstream_attribute),
        *standard_rope_model_bindings(stale_cache_policy, upstream_attribute),
    ]
    if consistent:
        bindings += consistent_decoding_bindings()
    return bindings
