"""
What the patches cover, stated once: the eras of upstream's code, the releases tested in each, and the models.

Everything that needs to know reads these tables: the run-time bindings (`patches/targets.py`), the version gate
(`patches/versions.py`, and `patches/requirements.txt`, which pyproject reads and a test keeps equal to
`supported_requirement()`), the self-check and the tests. Adding a release is a
row of `ERAS` (or a release in one) and a test run; adding a model is a row of `MODELS` and a test (see
docs/contributing.md).

This module imports only the standard library at the top, so the Makefile can read it without an environment.
"""

import re
from dataclasses import dataclass


# Eras


@dataclass(frozen=True)
class Era:
    """
    A span of transformers releases whose code has one shape where the patches touch it.

    Args:
        name: the releases, as people write them (`"4.51-5.23"`).
        first_release: the first release of the era (`"4.51"`); the era runs to the next one's first release.
        tested_releases: the releases of the era the whole suite runs on (`make test-matrix`).
        markers: regular expressions that all match (line by line) in the era's `models/phi3/modeling_phi3.py` and
            that an older era's do not all match: how an installed release or a source tree is recognised.
        phi3_rotary_override: the module of `patches/older_releases/` that replaces Phi-3's rotary code in
            this era, or `None` where the shared `dynamic_rope_update` decorator makes the update.
        models_update_their_own_frequencies: each rotary embedding calls a `_dynamic_frequency_update` of its own
            (before 4.51), which the pull request moves to `dynamic_rope_update`.
        cache_argument: what `forward` and `prepare_inputs_for_generation` call the cache.
        upstream_at_switch: what upstream does when a sequence crosses the longrope switch point.
        patch_replaces: what the patches replace.
        binds_series_rope_update: the era the pull-request series is written for, where the patches' longrope update
            is the series' own (`modeling_overrides.modeling_rope_utils.dynamic_rope_update`) wherever it applies.
    """

    name: str
    first_release: str
    tested_releases: tuple[str, ...]
    markers: tuple[str, ...]
    phi3_rotary_override: str | None
    models_update_their_own_frequencies: bool
    cache_argument: str
    upstream_at_switch: str
    patch_replaces: str
    binds_series_rope_update: bool = False

    def matches(self, modeling_phi3_source: str) -> bool:
        """Whether Phi-3's modeling source has this era's shape."""
        return all(re.search(marker, modeling_phi3_source, flags=re.MULTILINE) for marker in self.markers)


ERAS = (
    Era(
        name="4.44-4.47",
        first_release="4.44",
        tested_releases=("4.44.2", "4.46.3"),
        markers=(r"^class Phi3LongRoPEScaledRotaryEmbedding\b",),
        phi3_rotary_override="modeling_phi3_v4_46",
        models_update_their_own_frequencies=True,
        cache_argument="past_key_values",
        upstream_at_switch="`Phi3LongRoPEScaledRotaryEmbedding.forward` picks the factors per layer with a device->host "
        "sync; 4.44 keeps the stale cache in `generate()`, 4.45-4.47 drop it there and warn in the causal LM's "
        "`forward` at every step",
        patch_replaces="that `forward` (a device-side choice, per row) and, 4.45-4.47, the causal LM's `forward` "
        "without the warning (`modeling_phi3_v4_46.py`); the decoder, causal LM and generation decorated",
    ),
    Era(
        name="4.48-4.50",
        first_release="4.48",
        tested_releases=("4.50.3",),
        markers=(r"^    def _longrope_frequency_update\(",),
        phi3_rotary_override="modeling_phi3_v4_50",
        models_update_their_own_frequencies=True,
        cache_argument="past_key_values",
        upstream_at_switch="`Phi3RotaryEmbedding._longrope_frequency_update`, with a host sync; `generate()` drops the "
        "cache at the first crossing; batches across the switch wrong",
        patch_replaces="the rotary `forward`, in its 4.51 form with the patches' `dynamic_rope_update` "
        "(`modeling_phi3_v4_50.py`); decorators as above; the drop replaced",
    ),
    Era(
        name="4.51-5.23",
        first_release="4.51",
        tested_releases=("4.57.6", "5.23.0"),
        markers=(r"^    @dynamic_rope_update",),
        phi3_rotary_override=None,
        models_update_their_own_frequencies=False,
        cache_argument="past_key_values",
        upstream_at_switch="the `dynamic_rope_update` decorator, bound when the class is defined; `generate()` drops "
        "the cache at the first crossing for the Phi models only",
        patch_replaces="the rotary `forward`, re-decorated with the patches' `dynamic_rope_update`; decorators as "
        "above; the drop replaced",
    ),
    Era(
        name="5.24",
        first_release="5.24",
        tested_releases=("5.24.0",),
        markers=(r"^    @dynamic_rope_update", r"^        cache: Cache \| None = None,$"),
        phi3_rotary_override=None,
        models_update_their_own_frequencies=False,
        cache_argument="cache",
        upstream_at_switch="as 4.51-5.23; `past_key_values` is renamed `cache` (the old name a deprecated alias), and "
        "the drop is `cache = None`",
        patch_replaces="as 4.51-5.23; the decorators read the cache from whichever keyword the caller used; the "
        "longrope update is the pull-request series' own",
        binds_series_rope_update=True,
    ),
)
"""The eras, oldest first. Each release of `TESTED_VERSIONS` lies in its era, and is recognised as it (tested)."""

TESTED_VERSIONS = tuple(release for era in ERAS for release in era.tested_releases)
"""Releases the whole test suite runs against, oldest first; the newest is the one `make test` installs."""

NEWEST_TESTED_VERSION = TESTED_VERSIONS[-1]

SELF_CHECKED_RELEASES = (
    *("4.44.2", "4.45.2", "4.46.3", "4.47.1", "4.48.3", "4.49.0", "4.50.3", "4.51.3", "4.52.4", "4.53.3", "4.54.1"),
    *("4.55.4", "4.56.2", "4.57.6", "5.0.0", "5.1.0", "5.2.0", "5.3.0", "5.4.0", "5.5.4", "5.6.2", "5.7.0", "5.8.1"),
    *("5.9.0", "5.10.4", "5.11.0", "5.12.1", "5.13.1", "5.14.1", "5.15.1", "5.16.1", "5.17.0", "5.18.0", "5.19.0"),
    *("5.20.2", "5.21.1", "5.22.2", "5.23.0", "5.24.0"),
)
"""The latest patch release of every minor the supported range admits, oldest first: `python -m patches check` passes
on each (CI runs it: `scripts/test_matrix.py --self-check`), and the suite runs on those of `TESTED_VERSIONS`. A
test keeps it one release per minor of the range."""


class UnrecognisedEraError(ValueError):
    """Phi-3's modeling code has the shape of no era, or of another era than its release's."""


def release_tuple(release: str) -> tuple[int, int]:
    """`(major, minor)` of a release (`"5.24.0"`, `"5.25.0.dev0"`): what the tables compare."""
    major, minor = re.match(r"(\d+)\.(\d+)", release).groups()
    return int(major), int(minor)


def era_of_release(release: str) -> Era | None:
    """The era `release` (`"4.57.6"`, `"5.25.0.dev0"`) falls in by its number, or `None` before the first."""
    found = None
    for era in ERAS:
        if release_tuple(release) >= release_tuple(era.first_release):
            found = era
    return found


def recognise_era(modeling_phi3_source: str, release: str) -> Era:
    """
    The era of transformers `release`, whose `models/phi3/modeling_phi3.py` reads `modeling_phi3_source`. The
    run-time patches read the installed file, the pull request the tree's, so both recognise an era alike.

    Raises:
        UnrecognisedEraError: the source has the shape of no era, or not the shape of its release's era.
    """
    by_shape = next((era for era in reversed(ERAS) if era.matches(modeling_phi3_source)), None)
    by_release = era_of_release(release)
    if by_shape is None:
        raise UnrecognisedEraError(
            f"transformers {release}: Phi-3's modeling code has the shape of no known era ({', '.join(era.name for era in ERAS)})"
        )
    if by_shape is not by_release:
        expected = by_release.name if by_release is not None else "none"
        raise UnrecognisedEraError(
            f"transformers {release}: Phi-3's modeling code has the shape of the {by_shape.name} era, but the release "
            f"belongs to {expected}"
        )
    return by_shape


CONTINUOUS_BATCHING_FROM = "5.23"
"""The first release whose continuous batching (`generate_batch`, `transformers serve --continuous-batching`) the
patches protect: per-request RoPE frequencies in packed batches, and a request that crosses the switch prefilled
again. Releases with continuous batching before it (4.53 on) warn, once per manager, for a model whose RoPE
frequencies depend on the length; asynchronous batching and CUDA graphs warn on every release."""


def protects_continuous_batching(release: str) -> bool:
    """Whether the patches protect the continuous batching of transformers `release` (`"5.24.0"`, `"5.25.0.dev0"`)."""
    return release_tuple(release) >= release_tuple(CONTINUOUS_BATCHING_FROM)


CONTINUOUS_BATCHING = "continuous batching"
CONSISTENT_DECODING = "consistent decoding"
SERVING = "transformers serve"
"""The families of bindings that are not a model's (a model's family is its modeling module, `"phi3"`): `apply()`
leaves a family out whole when one of its bindings is refused."""


@dataclass(frozen=True)
class DecoratedMethod:
    """
    A method of transformers' continuous batching that gets a decorator of
    `patches/continuous_batching.py`.

    Args:
        module: its module in `transformers.generation.continuous_batching`.
        owner: its class.
        method: its name.
        decorator: the decorator's name.
        parameters: the parameters its signature starts with (checked before it is replaced).
        fingerprint: source fragments it contains (checked likewise).
        tracks_cache: it is about the cache (left as it is when every stale-cache policy is `"ignore"`).
    """

    module: str
    owner: str
    method: str
    decorator: str
    parameters: tuple[str, ...]
    fingerprint: tuple[str, ...]
    tracks_cache: bool


CONTINUOUS_BATCHING_METHODS = (
    DecoratedMethod(
        "input_outputs",
        "ContinuousBatchingIOs",
        "prepare_batch_tensors",
        "with_request_rope_lengths",
        ("self", "requests_in_batch"),
        ("state.position_offset += query_length", "self.requests_in_batch.append(future_state)"),
        tracks_cache=False,
    ),
    DecoratedMethod(
        "model_runner",
        "ModelRunner",
        "compute_batch",
        "rotate_each_request_alone",
        ("self", "model", "batch_data"),
        ("forward_fn(model, batch_data",),
        tracks_cache=False,
    ),
    DecoratedMethod(
        "continuous_api",
        "ContinuousBatchProcessor",
        "prepare_next_batch",
        "recompute_crossing_requests",
        ("self",),
        ("self.scheduler.schedule_batch(",),
        tracks_cache=True,
    ),
    DecoratedMethod(
        "cache",
        "PagedAttentionCache",
        "search_prefix_match",
        "share_prefix_within_first_regime",
        ("self", "request_id", "prompt_ids"),
        ("match_prefix_blocks(prompt_ids)",),
        tracks_cache=True,
    ),
    DecoratedMethod(
        "cache",
        "PagedAttentionCache",
        "mark_complete_blocks",
        "mark_blocks_within_first_regime",
        ("self", "state", "complete_blocks"),
        ("state.initial_tokens + state.generated_tokens",),
        tracks_cache=True,
    ),
)
"""Where the continuous-batching fix attaches, from `CONTINUOUS_BATCHING_FROM` on."""


def supported_requirement() -> str:
    """The transformers requirement the tested releases support: from the oldest to the newest one's minor."""
    major, minor = release_tuple(NEWEST_TESTED_VERSION)
    return f"transformers>={TESTED_VERSIONS[0]},<{major}.{minor + 1}"


# Models

STANDARD_ROTARY = "standard"
"""`XxxRotaryEmbedding(config)`, any `rope_type`, rotating with `inv_freq`, `forward(self, x, position_ids)`: the
patches re-decorate its `forward` with `dynamic_rope_update`."""
PHI3_ROTARY = "phi3"
"""Phi-3's, replaced per era (`Era.phi3_rotary_override`)."""
PHIMOE_ROTARY = "phimoe"
"""PhiMoE's, which builds its own tables (`patches/phimoe_rotary.py` from 5.0, `patches/older_releases/` before)."""

PER_ROW = "per row"
BATCH_WIDE_WITHOUT_POSITIONS = (
    "batch-wide where the rotary `forward` takes `seq_len` and no positions (PhiMoE before 5.0)"
)


@dataclass(frozen=True)
class Model:
    """
    A model the patches protect: its rotary embedding, decoder, causal LM and `generate()`.

    Args:
        prefix: the class prefix (`XxxRotaryEmbedding`, `XxxModel`, `XxxForCausalLM`).
        rotary: how its rotary embedding is patched (`STANDARD_ROTARY`, `PHI3_ROTARY`, `PHIMOE_ROTARY`).
        frequencies: whether each row is rotated by its own positions' factors (`PER_ROW`) or the batch by one set
            (`BATCH_WIDE_WITHOUT_POSITIONS`, read from the rotary `forward`'s parameters by `rotates_per_row`).
        consistent: `apply(consistent=True)` makes its attention batch-invariant.
        covered_from: the first release the patches cover it on (`None`: every release that has it), and why not
            before.
        self_check: the RoPE types `python -m patches check` decodes a tiny one with.
    """

    prefix: str
    rotary: str = STANDARD_ROTARY
    frequencies: str = PER_ROW
    consistent: bool = False
    covered_from: tuple[str, str] | None = None
    self_check: tuple[str, ...] = ()


_HYBRID_CACHE_BEFORE_4_57 = (
    "4.57",
    "on 4.50 its causal LM has its own `prepare_inputs_for_generation` (for a `HybridCache`), which the bindings refuse",
)

MODELS = {
    "phi3": Model("Phi3", rotary=PHI3_ROTARY, consistent=True, self_check=("longrope",)),
    "phimoe": Model(
        "Phimoe",
        rotary=PHIMOE_ROTARY,
        frequencies=BATCH_WIDE_WITHOUT_POSITIONS,
        consistent=True,
        self_check=("longrope",),
    ),
    "phi4_multimodal": Model("Phi4Multimodal", consistent=True, self_check=("longrope",)),
    "llama": Model("Llama", consistent=True, self_check=("longrope", "dynamic")),
    "mistral": Model("Mistral", consistent=True, self_check=("longrope",)),
    "qwen2": Model("Qwen2", consistent=True, self_check=("longrope",)),
    "apertus": Model("Apertus"),
    "apertus1p5": Model("Apertus1p5Text"),
    "arcee": Model("Arcee"),
    "aria": Model("AriaText"),
    "axk1": Model("AXK1"),
    "axk2": Model("AXK2"),
    "bailing_hybrid": Model("BailingHybrid"),
    "bitnet": Model("BitNet"),
    "cohere": Model("Cohere"),
    "cohere2": Model("Cohere2", covered_from=_HYBRID_CACHE_BEFORE_4_57),
    "cohere2_moe": Model("Cohere2Moe"),
    "cwm": Model("Cwm"),
    "dbrx": Model("Dbrx"),
    "deepseek_v2": Model("DeepseekV2"),
    "deepseek_v3": Model("DeepseekV3"),
    "deepseek_v32": Model("DeepseekV32"),
    "diffllama": Model("DiffLlama"),
    "doge": Model("Doge"),
    "dots1": Model("Dots1"),
    "ernie4_5": Model("Ernie4_5"),
    "ernie4_5_moe": Model("Ernie4_5_Moe"),
    "exaone4": Model("Exaone4"),
    "exaone_moe": Model("ExaoneMoe"),
    "flex_olmo": Model("FlexOlmo"),
    "flint": Model("Flint"),
    "gemma": Model("Gemma"),
    "gemma2": Model("Gemma2", covered_from=_HYBRID_CACHE_BEFORE_4_57),
    "glm": Model("Glm"),
    "glm4": Model("Glm4"),
    "glm4_moe": Model("Glm4Moe"),
    "glm4_moe_lite": Model("Glm4MoeLite"),
    "glm_moe_dsa": Model("GlmMoeDsa"),
    "gpt_oss": Model("GptOss"),
    "granite": Model("Granite"),
    "granite_swa": Model("GraniteSWA"),
    "helium": Model("Helium"),
    "hunyuan_v1_dense": Model("HunYuanDenseV1"),
    "hunyuan_v1_moe": Model("HunYuanMoEV1"),
    "hy_v3": Model("HYV3"),
    "hy_v4": Model("HYV4"),
    "hyperclovax": Model("HyperCLOVAX"),
    "jais2": Model("Jais2"),
    "jetmoe": Model("JetMoe"),
    "kolibri1": Model("Kolibri1"),
    "lara_mini": Model("LaraMini"),
    "lfm2": Model("Lfm2"),
    "lfm2_moe": Model("Lfm2Moe"),
    "longcat_flash": Model("LongcatFlash"),
    # Latent attention; its released checkpoints use longrope
    "minicpm3": Model("MiniCPM3", self_check=("longrope",)),
    "minimax_m2": Model("MiniMaxM2"),
    "ministral": Model("Ministral"),
    "ministral3": Model("Ministral3"),
    "mistral4": Model("Mistral4"),
    "mixtral": Model("Mixtral", self_check=("longrope",)),
    "moshi": Model(
        "Moshi",
        covered_from=(
            "5.0",
            "before 5.0 its cached decoding differs from decoding without cache whatever the RoPE (max |Δlogit| "
            "1.6e-2 with the default one on 4.57), so that nothing can check the patches on it",
        ),
    ),
    "nanochat": Model("NanoChat"),
    "nemotron": Model("Nemotron"),
    "olmo": Model("Olmo"),
    # Olmo's 4.x configs refuse longrope: checked with dynamic NTK
    "olmo2": Model("Olmo2", self_check=("dynamic",)),
    "olmo_hybrid": Model("OlmoHybrid"),
    "olmoe": Model("Olmoe"),
    "persimmon": Model("Persimmon"),
    "phi": Model("Phi"),
    "qwen2_moe": Model("Qwen2Moe"),
    "qwen3": Model("Qwen3", self_check=("longrope",)),
    "qwen3_moe": Model("Qwen3Moe"),
    "qwen3_next": Model("Qwen3Next"),
    "seed_oss": Model("SeedOss"),
    "smollm3": Model("SmolLM3"),
    "solar_open": Model("SolarOpen"),
    "stablelm": Model("StableLm"),
    "starcoder2": Model("Starcoder2"),
    "vaultgemma": Model("VaultGemma"),
    "youtu": Model("Youtu"),
}
"""
The models the patches protect, by modeling module. A config may give any of them longrope or dynamic NTK, and
upstream keeps their caches for neither (the Phi models' `generate()` drops the cache at the switch, nothing else
does). A release covers a model it has unless `model_exclusion` says otherwise; `tests/models/` decodes a tiny one of
each across the switch on every tested release.
"""

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
"""Models with a standard-looking rotary embedding that `MODELS` leaves out, and why: the bindings would be refused
on some tested release (`apply()` would then leave the model out with a warning on every call, and the self-check
fail), or the model does not have the shape they are written for, or the recompute is wrong for it. Upstream keeps
their caches stale across a switch, and so does the pull request."""

MODEL_CLASS_SUFFIXES = ("RotaryEmbedding", "Model", "ForCausalLM")


def model_exclusion(module_name: str, release: str, rotary_init_source: str, own_caches: list[str]) -> str | None:
    """
    Why the patches (and the pull request) leave `module_name`, a model of `MODELS` that transformers `release` has,
    out there, or `None` when they cover it: its rotary embedding takes no RoPE type from the config
    (`rotary_init_source`, the source of its `__init__`: Mistral and Qwen2 before 4.45 have no `rope_type`, Nemotron
    before 5.0 one always `"default"`), it has cache classes of its own (`own_caches`: the recompute empties
    transformers' caches in place, not their convolution and recurrent states), or `release` is older than its
    `covered_from`.
    """
    model = MODELS[module_name]
    if model.rotary == STANDARD_ROTARY and (
        "rope_type" not in rotary_init_source
        or not any(name in rotary_init_source for name in ("rope_scaling", "rope_parameters"))
    ):
        return f"in transformers {release}, {model.prefix}RotaryEmbedding takes no RoPE type from the config"
    if own_caches:
        return (
            f"in transformers {release}, {module_name} has its own cache ({', '.join(own_caches)}), whose states the "
            "recompute does not empty"
        )
    if model.covered_from is not None and release_tuple(model.covered_from[0]) > release_tuple(release):
        first, reason = model.covered_from
        return f"covered from transformers {first}: {reason}"
    return None


def rotates_per_row(rotary_forward_parameters: list[str]) -> bool:
    """Whether a rotary `forward` with these parameters rotates each row by its positions (`PER_ROW`), not the batch
    by one table for its first `seq_len` positions (PhiMoE before 5.0)."""
    return not ("seq_len" in rotary_forward_parameters and "position_ids" not in rotary_forward_parameters)
