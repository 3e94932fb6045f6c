"""
The self-check, `python -m patches check` (or `patches.check()`): on the installed transformers, decodes tiny random
models of every covered family across the RoPE switch with the patches applied, and compares each step with the
forward pass without cache over the same tokens (for a left-padded batch, each row alone). A path the patches do not
reach, after an upgrade of transformers say, shows up as FAILED.
"""

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from .coverage import MODELS
from .decoding_paths import decoding_paths
from .reference import FP32_TOLERANCE
from .tiny_models import (
    SWITCH_POINT,
    TRANSFORMERS_VERSION,
    reset_dynamic_rope,
    tiny_model,
    tiny_phi3_model,
    tiny_phi4_multimodal_model,
    tiny_phimoe_model,
    tiny_standard_model,
)


@dataclass(frozen=True)
class CheckedFamily:
    """A tiny model to decode, and the stale-cache policy it is checked under (`None`: the defaults). `not_covered`
    says why the patches do not cover the model on the installed release, if they do not."""

    name: str
    module_name: str
    not_covered: str | None
    build: Callable[[], torch.nn.Module]
    stale_cache: dict[str, str] | None = None
    rows_are_rotated_alone: bool = True
    rope_type: str = "longrope"


FAMILY_NAMES = {"phi3": "Phi-3", "phimoe": "PhiMoE", "phi4_multimodal": "Phi-4-multimodal", "minicpm3": "MiniCPM3"}
"""How the check names a family, where the name is not the model's class prefix."""

ROPE_TYPE_NAMES = {"longrope": "longrope", "dynamic": "dynamic NTK"}

TINY_MODEL_BUILDERS = {
    "phi3": lambda rope_type: tiny_phi3_model(),
    "phimoe": lambda rope_type: tiny_phimoe_model(),
    "phi4_multimodal": lambda rope_type: tiny_phi4_multimodal_model(),
    # Llama's tiny settings, which hold on every release (the generic configs need 4.45 for Mistral and Qwen2)
    **{name: partial(tiny_standard_model, name) for name in ("llama", "mistral", "qwen2")},
}
"""The tiny models of the checked families that `tiny_model` does not build (longrope only for the Phi models)."""


def _rows_are_rotated_alone(module_name: str, rope_type: str) -> bool:
    # Dynamic NTK scales the whole batch by its longest row, as upstream's does; PhiMoE before 5.0 chooses one factor
    # set for the whole batch
    return rope_type != "dynamic" and not (module_name == "phimoe" and TRANSFORMERS_VERSION.major < 5)


def checked_families() -> list[CheckedFamily]:
    """
    The models `coverage.MODELS` marks for the self-check, with each RoPE type it names (longrope for the Phi models,
    Llama, Mistral, Qwen2, and latent attention, a plain decoder and experts in MiniCPM3, Qwen3 and Mixtral; dynamic
    NTK for Llama and Olmo2, checked under `"recompute"`).
    """
    families = []
    for module_name, model in MODELS.items():
        for rope_type in model.self_check:
            build = TINY_MODEL_BUILDERS.get(module_name, partial(tiny_model, module_name))
            families.append(
                CheckedFamily(
                    f"{FAMILY_NAMES.get(module_name, model.prefix)} {ROPE_TYPE_NAMES[rope_type]}",
                    module_name,
                    _why_not_covered(module_name),
                    partial(build, rope_type),
                    {"dynamic": "recompute"} if rope_type == "dynamic" else None,
                    _rows_are_rotated_alone(module_name, rope_type),
                    rope_type,
                )
            )
    return families


def _why_not_covered(module_name: str) -> str | None:
    from .targets import covered_model

    return covered_model(module_name)[1]


@dataclass(frozen=True)
class PathResult:
    family: str
    path: str
    status: str  # "ok", "FAILED" or "skipped"
    detail: str


def _measure(model, measure) -> tuple[str, str]:
    """`(status, detail)` of one measurement against the tolerance; `"error"` when the path raised."""
    reset_dynamic_rope(model)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            errors = measure(model)
    except Exception as error:  # a path that breaks is a result to report, not a crash of the check
        return "error", f"{type(error).__name__}: {error}"[:200]
    worst = max(errors)
    return ("ok" if worst <= FP32_TOLERANCE else "FAILED"), f"max |Δlogit| {worst:.1e}"


@contextlib.contextmanager
def _unpatched():
    """Upstream's code for the scope, whatever the state before (which is restored)."""
    from . import apply, revert, status

    before = status()
    revert()
    try:
        yield
    finally:
        if before.applied:
            apply(stale_cache=before.stale_cache, force=True, consistent=before.consistent)


def _patched_result(model, measure) -> tuple[str, str]:
    """
    `(status, detail)` of a path, with the patches applied (by the caller). A path that raises is failed, unless
    upstream raises on it too: then the release does not have that path (Qwen2's eager attention takes no static cache
    in 4.44, say).
    """
    status, detail = _measure(model, measure)
    if status != "error":
        return status, detail
    with _unpatched():
        upstream_status, upstream_detail = _measure(model, measure)
    if upstream_status == "error":
        return "skipped", f"upstream raises on this path too: {upstream_detail}"
    return "FAILED", detail


def run_checks(force: bool = False, progress: Callable[[str], None] | None = print) -> list[PathResult]:
    """
    Applies the patches (restoring the state before on return) and checks every family and path. `progress` gets
    one line per path as it finishes. Raises what `patches.apply` raises for an untested release or a refused
    function, unless `force=True`. transformers' own notices (deprecations, lengths past the tiny models' maximum)
    are silenced meanwhile: they say nothing about the paths checked.
    """
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        left_out = _families_left_out(force)
        results = [
            PathResult(FAMILY_NAMES.get(family, family), "every path", "FAILED", f"left out by apply(): {reason}")
            for family, reason in left_out.items()
        ]
        results += _check_families(force, progress, skipped=set(left_out))
        kernels = _check_consistent_kernels()
        results.append(kernels)
        if progress is not None:
            progress(f"[{len(results):>3}] {kernels.family} · {kernels.path}: {kernels.status} ({kernels.detail})")
        return results
    finally:
        logging.set_verbosity(verbosity)


def _families_left_out(force: bool) -> dict[str, str]:
    """The families (models, continuous batching) that `apply()` leaves out on this release, with why: their paths
    are not protected, so each is a failed result of the check."""
    from . import applied

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what `apply()` warns about is what these results say
        with applied(force=force) as current:
            return current.unprotected


def _check_families(force: bool, progress: Callable[[str], None] | None, skipped: set[str]) -> list[PathResult]:
    """Decodes each checked family on each path, with the patches applied under its policy; the `skipped` families
    (left out by `apply()`, reported already) are not decoded."""
    from . import UnprotectedPathsWarning, applied

    results = []
    families = checked_families()
    for family in families:
        if family.not_covered is not None:
            results.append(PathResult(family.name, "every path", "skipped", family.not_covered))
            continue
        if family.module_name in skipped:
            continue
        # Applied once for the family's paths (`apply` and `revert` each scan the live objects for accelerate's hooks);
        # another family left out is reported already
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnprotectedPathsWarning)
            with applied(stale_cache=family.stale_cache, force=force):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        model = family.build()
                except Exception as error:  # upstream's config or model refuses the tiny settings: nothing to decode
                    reason = f"this release does not build the tiny model: {type(error).__name__}: {error}"[:200]
                    results.append(PathResult(family.name, "every path", "skipped", reason))
                    continue
                model.generation_config.pad_token_id = 0
                for path, measure in decoding_paths(family.rows_are_rotated_alone, family.rope_type).items():
                    started = time.monotonic()
                    if isinstance(measure, str):
                        result = PathResult(family.name, path, "skipped", measure)
                    else:
                        result = PathResult(family.name, path, *_patched_result(model, measure))
                    results.append(result)
                    if progress is not None:
                        elapsed = time.monotonic() - started
                        progress(
                            f"[{len(results):>3}] {family.name} · {path}: {result.status} ({result.detail}, "
                            f"{elapsed:.2f} s)"
                        )
    return results


def _check_consistent_kernels() -> PathResult:
    """Whether `apply(consistent=True)` would accept this machine: its kernels verified row-invariant (CPU, and CUDA
    where there is one), with the way of multiplying rows chosen for each dtype."""
    from .targets import consistent_decoding_bindings

    family, path = "consistent decoding", f"row-invariant kernels ({torch.get_num_threads()} threads)"
    if not consistent_decoding_bindings():
        return PathResult(family, path, "skipped", "consistent decoding needs transformers 4.48 or later")
    from . import consistent_decoding

    try:
        consistent_decoding.verify_kernels()
    except consistent_decoding.RowInvarianceError as error:
        return PathResult(family, path, "FAILED", " ".join(str(error).split()))
    weight = torch.zeros(1376, 512)
    chosen = {
        str(dtype).removeprefix("torch."): str(consistent_decoding.row_products_for(weight.to(dtype)))
        for dtype in consistent_decoding.DTYPES_CHECKED
    }
    return PathResult(family, path, "ok", "; ".join(f"{dtype}: {way}" for dtype, way in chosen.items()))


@dataclass(frozen=True)
class CheckReport:
    """What `patches.check()` found: one result per family and path; `passed` when none failed."""

    setting: str
    results: list[PathResult]

    @property
    def passed(self) -> bool:
        return any(result.status == "ok" for result in self.results) and all(
            result.status != "FAILED" for result in self.results
        )

    def __str__(self) -> str:
        failed = sum(result.status == "FAILED" for result in self.results)
        verdict = "PASSED" if self.passed else f"FAILED ({failed} of {len(self.results)} paths)"
        return f"{self.setting}\n\n{format_table(self.results)}\n\n{verdict}"


def format_table(results: list[PathResult]) -> str:
    """The results as a Markdown table, one row per family and path."""
    family_width = max(len(result.family) for result in results)
    path_width = max(len(result.path) for result in results)
    lines = [
        f"| {'model':<{family_width}} | {'path':<{path_width}} | result | detail |",
        f"|{'-' * (family_width + 2)}|{'-' * (path_width + 2)}|--------|--------|",
    ]
    lines += [
        f"| {result.family:<{family_width}} | {result.path:<{path_width}} | {result.status:<6} | {result.detail} |"
        for result in results
    ]
    return "\n".join(lines)


def describe_setting() -> str:
    import transformers

    return (
        f"transformers {transformers.__version__}, torch {torch.__version__}, tiny random fp32 models, RoPE switch "
        f"after {SWITCH_POINT} tokens, tolerance {FP32_TOLERANCE:.0e} against the forward pass without cache"
    )
