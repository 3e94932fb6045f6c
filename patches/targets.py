"""
The attributes of the installed transformers that the patches replace, and what replaces them.

What is covered is stated in `patches/coverage.py`: the eras of upstream's code (recognised from Phi-3's modeling
source, as the pull request recognises them) and the models. This module turns that into bindings, and every
replaced function is checked (signature and source fingerprint) against the one its replacement was written for; a
function that differs is refused, not patched blind.

For every covered model: its rotary embedding's `forward` is re-decorated with the patches' `dynamic_rope_update`
(Phi-3's replaced as its era needs, PhiMoE's by `patches/phimoe_rotary.py`; older releases' by
`patches/older_releases/`); its decoder's `forward` is
decorated with `check_rope_cache`, its causal LM's with `split_at_rope_switch`, and its `prepare_inputs_for_generation`
with `check_rope_cache_in_generation` (from 4.45 the generic implementation in place of the Phi models' own, whose
only addition is dropping the cache at the switch).

With `consistent=True`, `consistent_decoding_bindings` also replaces `torch.nn.Linear.forward`, the `forward` of the
SiLU classes `ACT2FN` builds, and, in the modeling modules of the models marked `consistent`,
`eager_attention_forward` and `ALL_ATTENTION_FUNCTIONS` (module attributes), with the row-invariant code of
`patches/consistent_decoding.py` (a feature of the patches only).
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable
from functools import partial

import torch

from . import rope_frequencies
from .binding import (
    Binding,
    all_checks,
    expect_leading_parameters,
    expect_parameters,
    expect_source,
    original_attribute,
    parameter_names,
    source,
)
from .coverage import (
    CONSISTENT_DECODING,
    CONTINUOUS_BATCHING,
    CONTINUOUS_BATCHING_METHODS,
    LEFT_OUT_MODELS,
    MODEL_CLASS_SUFFIXES,
    MODELS,
    PHI3_ROTARY,
    PHIMOE_ROTARY,
    SERVING,
    Era,
    Model,
    UnrecognisedEraError,
    era_of_release,
    model_exclusion,
    protects_continuous_batching,
    recognise_era,
    rotates_per_row,
)
from .rope_cache_utils import (
    check_rope_cache,
    check_rope_cache_in_generation,
    split_at_rope_switch,
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
# 4.45 gave each model's own version a `num_logits_to_keep` parameter (4.46 moved most of them to the generic one)
V4_45_PREPARE_INPUTS_PARAMETERS = [*V4_44_PREPARE_INPUTS_PARAMETERS[:-1], "num_logits_to_keep", "kwargs"]
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
    decorated = rope_frequencies.dynamic_rope_update(
        inspect.unwrap(original), series_longrope_update=_binds_series_rope_update()
    )
    return torch.no_grad()(decorated)


@functools.cache
def _binds_series_rope_update() -> bool:
    """Whether the installed release is the one the series is written for, whose longrope update the patches bind
    as the series leaves it (`Era.binds_series_rope_update`)."""
    import transformers

    era = era_of_release(transformers.__version__)
    return era is not None and era.binds_series_rope_update


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


def installed_era() -> Era:
    """The era of the installed transformers, recognised from Phi-3's modeling source as the pull request does.

    Raises:
        UnrecognisedEraError: that source has no known era's shape, or another era's than its release's.
    """
    import transformers
    from transformers.models.phi3 import modeling_phi3

    return recognise_era(inspect.getsource(modeling_phi3), transformers.__version__)


def _refused_binding(owner: type, attribute: str, reason: str) -> Binding:
    """A binding that is always refused, for `reason`: `apply()` then refuses as a whole, and says why."""
    return Binding(
        name=f"{owner.__name__}.{attribute}",
        owner=owner,
        attribute=attribute,
        replacement=lambda original: original,
        check=lambda original: reason,
    )


def phi3_rotary_bindings(modeling_phi3) -> list[Binding]:
    """The longrope frequency update, in whichever place the installed release's era makes it."""
    try:
        era = installed_era()
    except UnrecognisedEraError as error:
        return [_refused_binding(modeling_phi3.Phi3RotaryEmbedding, "forward", str(error))]
    if era.phi3_rotary_override == "modeling_phi3_v4_46":
        from .older_releases import modeling_phi3_v4_46

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
    if era.phi3_rotary_override == "modeling_phi3_v4_50":
        # `forward` calls the update methods, then rotates with `inv_freq`; it becomes the 4.51 form, whose update
        # (for the batch or for each row) is the `dynamic_rope_update` decorator's
        from .older_releases import modeling_phi3_v4_50

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
    own_source = _source(own) if own is not None else ""
    if own is None or all(
        fragment in own_source
        for fragment in ("original_max_position_embeddings", "super().prepare_inputs_for_generation(")
    ):
        # Inherited, or (Phi-3 and PhiMoE from 4.46) an override that only drops the cache at the switch and then
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

    # Releases before 4.46 give each model a complete version of its own (Phi-3's drops the cache at the switch from
    # 4.45: the decorator recomputes first, and feeds the whole sequence through the caller's cache whatever it drops)
    def check(original) -> str | None:
        for parameters in (V4_44_PREPARE_INPUTS_PARAMETERS, V4_45_PREPARE_INPUTS_PARAMETERS):
            if expect_parameters(parameters)(original) is None:
                return expect_source("input_ids[:, cache_position]")(original)
        return expect_parameters(V4_45_PREPARE_INPUTS_PARAMETERS)(original)

    return Binding(
        name=name,
        owner=causal_lm,
        attribute="prepare_inputs_for_generation",
        replacement=partial(check_rope_cache_in_generation, frequencies_per_row=frequencies_per_row),
        check=check,
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
    if (
        causal_lm.__name__ == "Phi3ForCausalLM"
        and V4_46_SWITCH_WARNING in _source(causal_lm_forward)
        and "loss_kwargs" in parameter_names(causal_lm_forward)
    ):
        # 4.46 and 4.47: the forward pass also warns at the switch, with a device->host synchronisation at every step.
        # 4.45's (without `loss_kwargs`, and its loss computed in place) is decorated as it is: its warning stays
        from .older_releases import modeling_phi3_v4_46

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


def _phimoe_rotary_binding(modeling_phimoe, frequencies_per_row: bool) -> Binding:
    """
    PhiMoE's rotary `forward`, which took three shapes:

    - 4.46 to 4.57: `forward(x, seq_len)` builds a table for the batch's first `seq_len` positions, choosing the
      factors by `seq_len` with a device->host synchronisation (and, before 4.51, one token early). It is called
      without positions, so the choice stays batch-wide; the caches follow that (`frequencies_per_row=False`).
    - 5.0 to 5.14: `forward(x, position_ids, layer_type)`, which refuses any `layer_type`, recomputes the short
      frequencies at every call and reads scales the module does not have (`self.long_mscale`).
    - From 5.15: `forward(x, position_ids)` recomputes the short frequencies at every call, so it never switches to
      the long ones, and picks its scale with a device->host synchronisation.
    """
    if not frequencies_per_row:
        from .older_releases import modeling_phimoe_v4_57

        return Binding(
            name="PhimoeRotaryEmbedding.forward",
            owner=modeling_phimoe.PhimoeRotaryEmbedding,
            attribute="forward",
            replacement=lambda original: modeling_phimoe_v4_57.PhimoeRotaryEmbedding.forward,
            check=all_checks(
                expect_parameters(["self", "x", "seq_len"]),
                expect_source(
                    "self.rope_init_fn(self.config, x.device, seq_len)", "long_mscale", "torch.arange(seq_len"
                ),
            ),
        )
    from . import phimoe_rotary

    def check(original) -> str | None:
        if original is not None and "layer_type" in parameter_names(original):
            return all_checks(
                expect_parameters(["self", "x", "position_ids", "layer_type"]),
                expect_source("does not support layer types", "self.rope_init_fn(self.config, x.device, seq_len)"),
            )(original)
        return all_checks(
            expect_parameters(["self", "x", "position_ids"]),
            expect_source("self.rope_init_fn(self.config)", "long_mscale", "short_mscale"),
        )(original)

    def replacement(original):
        if "layer_type" in parameter_names(original):
            return refusing_layer_types(phimoe_rotary.PhimoeRotaryEmbedding.forward)
        return phimoe_rotary.PhimoeRotaryEmbedding.forward

    return Binding(
        name="PhimoeRotaryEmbedding.forward",
        owner=modeling_phimoe.PhimoeRotaryEmbedding,
        attribute="forward",
        replacement=replacement,
        check=check,
    )


def refusing_layer_types(rotary_forward):
    """`rotary_forward` with the `layer_type` parameter 5.0 to 5.14 give a rotary embedding without layer types, which
    refuses any, as upstream's does there."""

    @functools.wraps(rotary_forward)
    def forward(self, x, position_ids=None, layer_type=None):
        if layer_type is not None:
            raise ValueError(
                f"{self.__class__.__name__} does not support layer types, but got `layer_type={layer_type}`"
            )
        return rotary_forward(self, x, position_ids)

    return forward


def _modeling_module(module_name: str):
    import importlib

    return importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")


def covered_model(module_name: str):
    """
    `(module, None)`, the installed release's modeling module of `module_name` (a model of `coverage.MODELS`) when
    the patches cover it there, or `(None, why not)`: the release does not have the model (or not its rotary
    embedding, decoder and causal LM), or `coverage.model_exclusion` leaves it out.
    """
    import transformers

    prefix = MODELS[module_name].prefix
    release = transformers.__version__
    try:
        module = _modeling_module(module_name)
    except ImportError:
        return None, f"transformers {release} does not have {module_name}"
    missing = [prefix + suffix for suffix in MODEL_CLASS_SUFFIXES if not hasattr(module, prefix + suffix)]
    if missing:
        return None, f"transformers {release} has no {', '.join(missing)}"
    own_caches = [
        name
        for name, value in vars(module).items()
        if isinstance(value, type) and name.endswith("Cache") and value.__module__ == module.__name__
    ]
    rotary_init_source = _source(getattr(module, f"{prefix}RotaryEmbedding").__init__)
    reason = model_exclusion(module_name, release, rotary_init_source, own_caches)
    return (None, reason) if reason is not None else (module, None)


def left_out_models() -> dict[str, str]:
    """
    The models of the installed release that have a standard-looking rotary embedding but are not protected, with
    why: those of `coverage.LEFT_OUT_MODELS`, and those of `coverage.MODELS` that `covered_model` leaves out on this
    release. A config with `longrope` or `dynamic` scaling keeps their caches stale across a switch, as upstream does.
    Models the release does not have are not listed.
    """
    import importlib.util

    left_out = {}
    for module_name in MODELS:
        module, reason = covered_model(module_name)
        if module is None and "does not have" not in reason:
            left_out[module_name] = reason
    for module_name, reason in LEFT_OUT_MODELS.items():
        if importlib.util.find_spec(f"transformers.models.{module_name}") is not None:
            left_out[module_name] = reason
    return dict(sorted(left_out.items()))


def _rotary_bindings(module, model: Model, upstream_attribute: UpstreamAttribute) -> tuple[list[Binding], bool]:
    """A covered model's rotary bindings, and whether its rotary embedding rotates each row by its own positions."""
    rotary_embedding = getattr(module, f"{model.prefix}RotaryEmbedding")
    if model.rotary == PHI3_ROTARY:
        return phi3_rotary_bindings(module), True
    if model.rotary == PHIMOE_ROTARY:
        rotary_forward = upstream_attribute(rotary_embedding, "forward")
        per_row = rotates_per_row(list(inspect.signature(inspect.unwrap(rotary_forward)).parameters))
        return [_phimoe_rotary_binding(module, per_row)], per_row
    return [_standard_rotary_binding(rotary_embedding)], True


def model_bindings(stale_cache_policy: dict[str, str], upstream_attribute: UpstreamAttribute) -> list[Binding]:
    """
    Bindings for every model of `coverage.MODELS` that the installed release has and the patches cover there
    (`covered_model`): its rotary embedding and, unless every cache is ignored, its decoder, causal LM and generation.
    Each carries its model as `family`. A model whose code cannot even be read as the bindings expect gets one refused
    binding saying why, so that `apply()` leaves that model out and no other.
    """
    bindings = []
    for module_name in MODELS:
        try:
            family_bindings = _family_bindings(module_name, stale_cache_policy, upstream_attribute)
        except Exception as error:  # a release the bindings were not written for: that model is refused, not apply()
            family_bindings = [_unreadable_family_binding(module_name, error)]
        bindings += [dataclasses.replace(binding, family=module_name) for binding in family_bindings]
    return bindings


def _family_bindings(
    module_name: str, stale_cache_policy: dict[str, str], upstream_attribute: UpstreamAttribute
) -> list[Binding]:
    module, _ = covered_model(module_name)
    if module is None:
        return []
    model = MODELS[module_name]
    bindings, frequencies_per_row = _rotary_bindings(module, model, upstream_attribute)
    if _tracks_any_cache(stale_cache_policy):
        decoder, causal_lm = getattr(module, f"{model.prefix}Model"), getattr(module, f"{model.prefix}ForCausalLM")
        bindings += cache_bindings(decoder, causal_lm, upstream_attribute, frequencies_per_row)
    return bindings


def _unreadable_family_binding(family: str, error: Exception) -> Binding:
    """A refused binding standing for a whole family (or optional part) whose code the bindings could not read."""
    reason = f"the patches cannot read its code on this release ({type(error).__name__}: {error})"
    return Binding(
        name=f"{family} (every binding)",
        owner=type(None),
        attribute="",
        replacement=lambda original: original,
        check=lambda original: reason,
        family=family,
    )


def continuous_batching_bindings(stale_cache_policy: dict[str, str]) -> list[Binding]:
    """
    Continuous batching (`generate_batch`, `transformers serve --continuous-batching`), from
    `coverage.CONTINUOUS_BATCHING_FROM`: the decorators of `coverage.CONTINUOUS_BATCHING_METHODS` (each packed request
    rotated with its own length's frequencies and, unless every cache is ignored, a request that crosses the switch
    prefilled again and prefix sharing kept within the first RoPE regime). Releases with continuous batching before
    it get a warning when a model with such a RoPE starts it; releases without it, nothing. Where the release's
    continuous batching cannot be read as the bindings expect (a module or class it lacks), one refused binding says
    why: `apply()` then leaves continuous batching out, with a warning, and protects the rest.
    """
    import importlib.util

    if importlib.util.find_spec("transformers.generation.continuous_batching") is None:
        return []
    try:
        bindings = _continuous_batching_bindings(stale_cache_policy)
    except Exception as error:  # an optional part of the release: never an exception out of apply()
        bindings = [_unreadable_family_binding(CONTINUOUS_BATCHING, error)]
    return [dataclasses.replace(binding, family=CONTINUOUS_BATCHING) for binding in bindings]


def _continuous_batching_bindings(stale_cache_policy: dict[str, str]) -> list[Binding]:
    import importlib

    import transformers

    package = "transformers.generation.continuous_batching"
    if not protects_continuous_batching(transformers.__version__):
        return [unprotected_continuous_batching_binding()]
    # Imported only here: it imports the release's continuous batching, whose modules older releases lack
    from . import continuous_batching as rope_batching

    bindings = []
    for method in CONTINUOUS_BATCHING_METHODS:
        if method.tracks_cache and not _tracks_any_cache(stale_cache_policy):
            continue
        owner = getattr(importlib.import_module(f"{package}.{method.module}"), method.owner)
        bindings.append(
            Binding(
                name=f"{method.owner}.{method.method}",
                owner=owner,
                attribute=method.method,
                replacement=getattr(rope_batching, method.decorator),
                check=all_checks(
                    expect_leading_parameters(list(method.parameters)), expect_source(*method.fingerprint)
                ),
            )
        )
    return bindings


def serving_bindings(stale_cache_policy: dict[str, str], consistent: bool) -> list[Binding]:
    """
    `transformers serve` where it decodes in a process it spawns for each model (5.25 on): that process's target,
    `EngineClient.run_engine`, applies the patches there first, with this policy and mode
    (`serving.run_in_patched_process`). A server that decodes in its own process (before 5.25), or none (no serving
    extra installed), needs nothing. Where the release spawns its processes otherwise than the binding reads, one
    refused binding says why: `apply()` then leaves the server out, with a warning, and protects the rest.
    """
    import importlib

    try:
        model_manager = importlib.import_module("transformers.cli.serving.model_manager")
    except Exception:  # no server to run: without the serving extra, some releases fail to import it (NameError)
        return []
    if "multiprocessing" not in source(model_manager):  # it decodes in its own process, which `apply()` patches
        return []
    try:
        bindings = [_engine_process_binding(model_manager.EngineClient, stale_cache_policy, consistent)]
    except Exception as error:  # an optional part of the release: never an exception out of apply()
        bindings = [_unreadable_family_binding(SERVING, error)]
    return [dataclasses.replace(binding, family=SERVING) for binding in bindings]


def _engine_process_binding(engine_client: type, stale_cache_policy: dict[str, str], consistent: bool) -> Binding:
    from .serving import run_in_patched_process

    def check(original) -> str | None:
        # The process is spawned by `start_process`, with `EngineClient.run_engine` as its target
        return all_checks(
            expect_leading_parameters(["load", "generation_state", "requests", "results", "writer"]),
            lambda original: expect_source('get_context("spawn")', "EngineClient.run_engine")(
                original_attribute(engine_client, "start_process")
            ),
        )(original)

    return Binding(
        name="EngineClient.run_engine",
        owner=engine_client,
        attribute="run_engine",
        replacement=lambda original: run_in_patched_process(
            engine_client, "run_engine", stale_cache_policy, consistent
        ),
        check=check,
    )


def unprotected_continuous_batching_binding() -> Binding:
    """`ContinuousBatchingManager.__init__` warning that a model whose RoPE frequencies depend on the length is not
    protected there: for releases before `CONTINUOUS_BATCHING_FROM`, and where continuous batching is left out."""
    import importlib

    from .unprotected import warn_in_unprotected_continuous_batching

    package = importlib.import_module("transformers.generation.continuous_batching")
    # A module of its own until 4.56, a package (the manager in `continuous_api`) from 4.57
    if hasattr(package, "__path__"):
        package = importlib.import_module(f"{package.__name__}.continuous_api")
    return Binding(
        name="ContinuousBatchingManager.__init__",
        owner=package.ContinuousBatchingManager,
        attribute="__init__",
        replacement=warn_in_unprotected_continuous_batching,
        check=expect_leading_parameters(["self", "model"]),
        family=CONTINUOUS_BATCHING,
    )


def unprotected_family_bindings(unprotected: dict[str, str]) -> list[Binding]:
    """
    The guards of the families `apply()` leaves out (`unprotected`: family -> why): a left-out model's decoder
    `forward` warns when a cache crosses a switch through it (`unprotected.warn_across_rope_switch`), and continuous
    batching left out warns when a model with such a RoPE starts it. A family whose decoder the release does not have
    (or no longer defines) gets none.
    """
    from .unprotected import warn_across_rope_switch

    bindings = []
    for family, reason in unprotected.items():
        try:
            if family == CONTINUOUS_BATCHING:
                bindings.append(dataclasses.replace(unprotected_continuous_batching_binding(), guard=True))
                continue
            if family not in MODELS:
                continue
            decoder = getattr(_modeling_module(family), f"{MODELS[family].prefix}Model")
        except Exception:  # nothing there to guard
            continue
        if original_attribute(decoder, "forward") is None:
            continue
        bindings.append(
            Binding(
                name=f"{decoder.__name__}.forward",
                owner=decoder,
                attribute="forward",
                replacement=partial(warn_across_rope_switch, family=family, reason=reason),
                check=lambda original: None,
                family=family,
                guard=True,
            )
        )
    return bindings


EAGER_ATTENTION_PARAMETERS = ["module", "query", "key", "value", "attention_mask", "scaling", "dropout", "kwargs"]


def _attention_functions_with_consistent_sdpa(original):
    """A copy of a modeling module's `ALL_ATTENTION_FUNCTIONS` whose `"sdpa"` is the consistent attention."""
    from .consistent_decoding import consistent_sdpa_attention_forward

    if isinstance(original, dict):  # before 4.51
        return {**original, "sdpa": consistent_sdpa_attention_forward}
    functions = type(original)()
    functions["sdpa"] = consistent_sdpa_attention_forward  # a local entry, which takes precedence over the global ones
    return functions


def _silu_classes() -> list[type]:
    """The classes `ACT2FN["silu"]` and `ACT2FN["swish"]` build on the installed release."""
    from transformers import activations

    classes = [torch.nn.SiLU]
    if hasattr(activations, "SiLUActivation") and activations.SiLUActivation not in classes:
        classes.append(activations.SiLUActivation)  # 5.x
    return classes


def consistent_decoding_bindings() -> list[Binding]:
    """
    The bindings of `consistent=True`: every `nn.Linear` multiplies its rows in a way verified row-invariant on the
    running machine, SiLU is computed with kernels vectorised to the last element, and the attention of the models
    marked `consistent` in the table (requested as `"eager"` or `"sdpa"`) gives each query the same result whatever
    queries come with it and whether its keys were cached.
    Empty when the installed release does not share attention functions through `ALL_ATTENTION_FUNCTIONS` (before
    4.48).
    """

    from . import consistent_decoding

    bindings = []
    for module_name in (name for name, model in MODELS.items() if model.consistent):
        try:
            module = _modeling_module(module_name)
        except ImportError:
            continue
        if not hasattr(module, "eager_attention_forward") or not hasattr(module, "ALL_ATTENTION_FUNCTIONS"):
            continue
        bindings += [
            Binding(
                name=f"modeling_{module_name}.eager_attention_forward",
                owner=module,
                attribute="eager_attention_forward",
                replacement=lambda original: consistent_decoding.consistent_eager_attention_forward,
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
            replacement=lambda original: consistent_decoding.RowInvariantLinear.forward,
            check=expect_parameters(["self", "input"]),
        )
    )
    for silu_class in _silu_classes():
        bindings.append(
            Binding(
                name=f"{silu_class.__module__}.{silu_class.__name__}.forward",
                owner=silu_class,
                attribute="forward",
                replacement=lambda original: consistent_decoding.RowInvariantSiLU.forward,
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
    bindings = model_bindings(stale_cache_policy, upstream_attribute)
    bindings += continuous_batching_bindings(stale_cache_policy)
    bindings += serving_bindings(stale_cache_policy, consistent)
    if consistent:
        bindings += [
            dataclasses.replace(binding, family=CONSISTENT_DECODING) for binding in consistent_decoding_bindings()
        ]
    return bindings
