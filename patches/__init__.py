"""
Binds the fixes to the installed transformers at run time: the frequency updates (`rope_frequencies`, and the rotary
`forward`s of `phimoe_rotary` and `older_releases`), the cache record and its policies (`rope_cache_utils`), continuous
batching (`continuous_batching`) and consistent mode (`consistent_decoding`). The pull-request series' code is in
`modeling_overrides`.

    import patches
    patches.apply()                  # or: import patches.auto
    patches.apply(stale_cache="warn")
    patches.apply(consistent=True)   # cached decoding bitwise equal to decoding without cache
    patches.status()
    patches.revert()
    patches.check()                  # or: python -m patches check, after upgrading transformers

    with patches.applied(stale_cache="raise"):
        ...
"""

import contextlib
import threading
import warnings
from dataclasses import dataclass, field

from . import versions
from .binding import Binding, original_attribute
from .consistent_decoding import ConsistentDecodingCompileError
from .coverage import CONSISTENT_DECODING, CONTINUOUS_BATCHING, SERVING
from .hooks import rebind_all_hooked_forwards
from .rope_cache_utils import (
    DEFAULT_STALE_CACHE_POLICIES,
    STALE_CACHE_POLICIES,
    StaleRopeCacheError,
    StaleRopeCacheWarning,
    get_stale_cache_policies,
    normalize_stale_cache_policy,
    set_stale_cache_policy,
)


__all__ = [
    "DEFAULT_STALE_CACHE_POLICIES",
    "STALE_CACHE_POLICIES",
    "PatchStatus",
    "StaleRopeCacheError",
    "StaleRopeCacheWarning",
    "ConsistentDecodingCompileError",
    "ConsistentDecodingUnavailableError",
    "PatchRefusedError",
    "UnprotectedPathsWarning",
    "UnsupportedTransformersVersionError",
    "apply",
    "applied",
    "check",
    "revert",
    "status",
]


class UnsupportedTransformersVersionError(RuntimeError):
    """The installed transformers release is outside the range the patches are written and tested for."""


class PatchRefusedError(RuntimeError):
    """A function the patches must replace is not the one they were written for: nothing was changed."""


class UnprotectedPathsWarning(UserWarning):
    """`apply()` left a model family (or continuous batching) as upstream wrote it, because one of its functions is
    not the one the patches were written for: decoding through it is not protected, and warns across a switch."""


@dataclass
class PatchStatus:
    """What `patches` has done to the installed transformers."""

    transformers_version: str
    supported_range: str
    version_supported: bool
    applied: bool
    stale_cache: dict[str, str]
    consistent: bool = False
    patched: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    # The families (a model's modeling module, or "continuous batching") left out because a function of theirs was
    # refused, with why; and what warns in them across a switch instead
    unprotected: dict[str, str] = field(default_factory=dict)
    guarded: list[str] = field(default_factory=list)
    # Models of this release with a standard-looking rotary embedding that the patches leave out, and why
    left_out: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        support = "supported" if self.version_supported else "NOT supported"
        applied = "no"
        if self.applied:
            applied = (
                f"PARTIALLY ({len(self.unprotected)} left out, their paths unprotected: {', '.join(self.unprotected)})"
                if self.unprotected
                else "yes"
            )
        lines = [
            f"transformers {self.transformers_version} ({support}; supported: {self.supported_range})",
            f"applied: {applied}",
            f"stale_cache: {self.stale_cache}",
            f"consistent: {'yes' if self.consistent else 'no'}",
        ]
        lines += [f"  patched  {name}" for name in self.patched]
        lines += [f"  refused  {name}: {reason}" for name, reason in self.refused.items()]
        lines += [f"  guarded  {name} (warns across a switch)" for name in self.guarded]
        lines += [
            f"  left out {name} (stale across a switch, as upstream): {reason}"
            for name, reason in self.left_out.items()
        ]
        return "\n".join(lines)


_lock = threading.RLock()
# (owner, attribute) -> the attribute as the class held it before `apply` (`None` if it inherited it)
_originals: dict[tuple[type, str], object] = {}
_patched: dict[tuple[type, str], str] = {}
_refused: dict[str, str] = {}
_unprotected: dict[str, str] = {}
_left_out: dict[str, str] = {}
# `(owner, attribute, old, new)` of the attributes changed since the last scan for modules hooked by accelerate
_hook_changes: list[tuple[type, str, object, object]] = []
# The bound guards: upstream's code of a left-out family, wrapped only to warn across a switch
_guard_keys: set[tuple[type, str]] = set()
_applied = False
_consistent = False


class ConsistentDecodingUnavailableError(RuntimeError):
    """`consistent=True` was asked of a transformers release whose attention it cannot replace."""


def _verify_consistent_kernels() -> None:
    """Refuses consistent decoding where this machine's kernels are not row-invariant (checked once per thread count)."""
    from .consistent_decoding import RowInvarianceError, verify_kernels

    try:
        verify_kernels()
    except RowInvarianceError as error:
        raise ConsistentDecodingUnavailableError(f"{error}\nNothing was changed.") from error


def apply(
    stale_cache: str | dict[str, str] | None = None, force: bool = False, consistent: bool = False
) -> PatchStatus:
    """
    Patches the installed transformers so that decoding with a KV cache matches decoding without one.

    Idempotent and thread-safe. Calling it again with another policy switches to that policy. Models built before
    or after the call are patched alike: the patches replace methods of their classes.

    Args:
        stale_cache (`str`, `dict[str, str]` or `None`, defaults to `None`):
            What to do when a cache was computed with RoPE frequencies that no longer apply: one of
            `STALE_CACHE_POLICIES` for every RoPE type, or a dict from RoPE type (`"longrope"`, `"dynamic"`) to one
            of them. Types left out, and `None`, get `DEFAULT_STALE_CACHE_POLICIES`: `"recompute"` for longrope,
            `"warn"` for dynamic NTK.
        force (`bool`, defaults to `False`):
            Patch anyway: a transformers release outside the tested range, or one where every model family (or a
            function of consistent decoding) is refused. Each replaced function is still checked, and its family
            left out if it differs.
        consistent (`bool`, defaults to `False`):
            Make cached decoding bitwise equal to the forward pass without cache over the same tokens, for the Llama
            and Phi-3 families: every `torch.nn.Linear` and SiLU (in the whole process) and their attention compute
            each row as if it came alone, once this machine's kernels are checked row-invariant (about a second).
            Eager only (`ConsistentDecodingCompileError` under `torch.compile`); costs speed (README, "Bitwise-consistent
            decoding"). Without it, outputs are bitwise what they were.

    A model family one of whose functions is not the one the patches were written for (a newer release renamed an
    argument, say) is left out whole, and the others are patched: an `UnprotectedPathsWarning` names it and why,
    `status().unprotected` lists it, and its decoder warns (`StaleRopeCacheWarning`), or raises under `"raise"`, when a
    cache crosses a switch through it. Continuous batching likewise.

    Returns:
        The `PatchStatus` after the call.

    Raises:
        `ValueError`: for an unknown policy. `TypeError`: for a `force` or `consistent` that is not a `bool`.
        `UnsupportedTransformersVersionError`: for a release outside the tested range, unless `force=True`.
        `PatchRefusedError`: when every model family is refused, or a function of consistent decoding is, naming
            each function and why, unless `force=True`. Nothing is changed.
        `ConsistentDecodingUnavailableError`: for `consistent=True` on a release before 4.48, whose models do not
            share attention functions, or on a machine whose kernels are not row-invariant (naming each). Nothing is
            changed.
    """
    _expect_bool("force", force)
    _expect_bool("consistent", consistent)
    policy = normalize_stale_cache_policy(stale_cache)
    version = versions.installed_version()
    _refuse_unsupported_version(version, force)
    if consistent:
        _refuse_unavailable_consistent_decoding(version)
    with _lock:
        current, refused = _apply_locked(policy, force, consistent, version)
    if current.unprotected:
        _warn_unprotected(current.unprotected, refused)
    return current


def _warn_unprotected(unprotected: dict[str, str], refused: dict[str, str]) -> None:
    warnings.warn(
        f"patches.apply() left {', '.join(unprotected)} as upstream wrote it, so decoding through it is not "
        f"protected (it warns when a cache crosses a RoPE switch): {_describe_refusals(refused)} Every other family "
        "is patched. Check for a newer release of the patches, and run `python -m patches check`.",
        UnprotectedPathsWarning,
        stacklevel=3,
    )


def _refuse_unsupported_version(version, force: bool) -> None:
    if versions.is_supported(version) or force:
        return
    raise UnsupportedTransformersVersionError(
        f"patches is tested with transformers {versions.supported_range()} (newest tested: "
        f"{versions.NEWEST_TESTED_VERSION}), but {version} is installed. Nothing was changed. Install a tested "
        "release, or pass `force=True` to patch anyway and then run `python -m patches check` to see which "
        "decoding paths it protects (each replaced function is still checked, and its family left out if it is not "
        "the one the patch was written for)."
    )


def _refuse_unavailable_consistent_decoding(version) -> None:
    from .targets import consistent_decoding_bindings

    if not consistent_decoding_bindings():
        raise ConsistentDecodingUnavailableError(
            f"consistent=True needs transformers>=4.48, whose models share attention functions "
            f"(`ALL_ATTENTION_FUNCTIONS`, `eager_attention_forward`); {version} is installed. Nothing was changed."
        )
    _verify_consistent_kernels()


def _apply_locked(policy: dict[str, str], force: bool, consistent: bool, version) -> tuple[PatchStatus, dict]:
    """`apply`'s work under the lock: binds every family but those with a refused binding, which get their guards.
    Returns the status and the refused bindings' reasons."""
    global _applied, _consistent
    from .targets import all_bindings, left_out_models, unprotected_family_bindings

    wanted = all_bindings(policy, upstream_attribute=_upstream_attribute, consistent=consistent)
    refused = _refusals(wanted)
    unprotected = _families_left_out(wanted, refused)
    if not force:
        _refuse_if_nothing_is_protected(wanted, refused, unprotected, version)
    kept = [binding for binding in wanted if binding.family not in unprotected]
    _bind_exactly(kept + unprotected_family_bindings(unprotected))
    _refused.clear()
    _refused.update(refused)
    _unprotected.clear()
    _unprotected.update(unprotected)
    _left_out.clear()
    _left_out.update(left_out_models())
    _rebind_hooked_modules()
    set_stale_cache_policy(policy)
    _consistent = consistent
    _applied = True
    return status(), refused


def revert() -> PatchStatus:
    """Puts back the original transformers functions (the very same objects) and the default policy."""
    global _applied, _consistent
    with _lock:
        for key in list(_patched):
            _restore(key)
        _guard_keys.clear()
        _rebind_hooked_modules()
        _refused.clear()
        _unprotected.clear()
        _left_out.clear()
        set_stale_cache_policy(None)
        _consistent = False
        _applied = False
        return status()


def status() -> PatchStatus:
    """Reports the transformers version, what is patched, what was refused and why, and the policy in force."""
    version = versions.installed_version()
    with _lock:
        return PatchStatus(
            transformers_version=str(version),
            supported_range=versions.supported_range(),
            version_supported=versions.is_supported(version),
            applied=_applied,
            # Read from where the decorators read it: one store, whoever set it
            stale_cache=get_stale_cache_policies(),
            consistent=_consistent,
            patched=sorted(name for key, name in _patched.items() if key not in _guard_keys),
            refused=dict(_refused),
            unprotected=dict(_unprotected),
            guarded=sorted(name for key, name in _patched.items() if key in _guard_keys),
            left_out=dict(_left_out),
        )


@contextlib.contextmanager
def applied(stale_cache: str | dict[str, str] | None = None, force: bool = False, consistent: bool = False):
    """
    Context manager: applies the patches on entry and, on exit, returns to the state before it (reverted, or
    applied with the previous policy and consistency).
    """
    with _lock:
        was_applied, previous_policy, was_consistent = _applied, get_stale_cache_policies(), _consistent
        apply(stale_cache=stale_cache, force=force, consistent=consistent)
    try:
        yield status()
    finally:
        with _lock:
            if was_applied:
                apply(stale_cache=previous_policy, force=True, consistent=was_consistent)
            else:
                revert()


def check(force: bool = False, verbose: bool = True):
    """
    Decodes tiny random models of every covered family across the RoPE switch with the patches applied, on every
    path (hand-written loops, `generate()` greedy, sampling, beam search, prompt lookup, left-padded batches), and
    compares each step with the forward pass without cache over the same tokens. Run it after upgrading
    transformers. The patches are back in their state before the call when it returns.

    Args:
        force (`bool`, defaults to `False`): check a release outside the tested range, or with refused functions
            (see `apply`); without it, such a release is reported as failed with `apply`'s error.
        verbose (`bool`, defaults to `True`): print a line per path as it finishes, then the table.

    Returns:
        A `CheckReport`: `passed`, and one result per family and path (`str()` gives the table).
    """
    from .selfcheck import CheckReport, PathResult, describe_setting, run_checks

    _expect_bool("force", force)
    setting = describe_setting()
    if verbose:
        print(setting, flush=True)
    try:
        results = run_checks(force=force, progress=(lambda line: print(line, flush=True)) if verbose else None)
    except (UnsupportedTransformersVersionError, PatchRefusedError) as error:
        results = [PathResult("patches.apply()", "every path", "FAILED", str(error))]
    report = CheckReport(setting, results)
    if verbose:
        print(f"\n{report}")
    return report


def _expect_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be `True` or `False`, got {value!r}.")


def _refusals(bindings: list[Binding]) -> dict[str, str]:
    """Why each binding whose upstream function is not the one its replacement was written for is refused."""
    refused = {}
    for binding in bindings:
        reason = binding.check(_upstream_attribute(binding.owner, binding.attribute))
        if reason is not None:
            refused[binding.name] = reason
    return refused


def _families_left_out(bindings: list[Binding], refused: dict[str, str]) -> dict[str, str]:
    """The families with a refused binding, each with why: `apply()` leaves each of them out whole."""
    left_out: dict[str, list[str]] = {}
    for binding in bindings:
        if binding.name in refused:
            left_out.setdefault(binding.family, []).append(f"`{binding.name}`: {refused[binding.name]}")
    return {family: "; ".join(reasons) for family, reasons in left_out.items()}


def _refuse_if_nothing_is_protected(
    bindings: list[Binding], refused: dict[str, str], unprotected: dict[str, str], version
) -> None:
    """Raises `PatchRefusedError` where leaving families out would protect no model, or would drop the consistent
    decoding the caller asked for: nothing is changed then."""
    model_families = {binding.family for binding in bindings} - {CONTINUOUS_BATCHING, CONSISTENT_DECODING, SERVING}
    if CONSISTENT_DECODING not in unprotected and not (model_families and model_families <= set(unprotected)):
        return
    raise PatchRefusedError(
        f"transformers {version} is not what the patches were written for: {_describe_refusals(refused)} Nothing was "
        "changed. Check for a newer release of the patches, or pass `force=True` to patch what is left (the families "
        "refused then stay as upstream has them)."
    )


def _describe_refusals(refused: dict[str, str]) -> str:
    return " ".join(f"`{name}`: {reason}." for name, reason in refused.items())


def _upstream_attribute(owner: type, attribute: str):
    """The attribute as upstream defines it, even while it is replaced; `None` if the class only inherits it."""
    key = (owner, attribute)
    return _originals[key] if key in _patched else original_attribute(owner, attribute)


def _bind_exactly(bindings: list[Binding]) -> None:
    """Leaves exactly `bindings` bound: every other replaced attribute, or one replaced by another binding than
    asked now (a family's own binding where its guard is wanted, say), is put back first."""
    wanted = {(binding.owner, binding.attribute): (binding.name, binding.guard) for binding in bindings}
    for key, name in list(_patched.items()):
        if wanted.get(key) != (name, key in _guard_keys):
            _restore(key)
    for binding in bindings:
        _bind(binding)
    _guard_keys.clear()
    _guard_keys.update((binding.owner, binding.attribute) for binding in bindings if binding.guard)


def _bind(binding: Binding) -> None:
    """Replaces one attribute that `_refusals` accepted (nothing to do if it is replaced already)."""
    key = (binding.owner, binding.attribute)
    if key in _patched:
        return
    original = original_attribute(binding.owner, binding.attribute)
    _originals[key] = original
    resolved = getattr(binding.owner, binding.attribute, None)
    setattr(binding.owner, binding.attribute, binding.replacement(original))
    _hook_changes.append((binding.owner, binding.attribute, resolved, getattr(binding.owner, binding.attribute)))
    _patched[key] = binding.name


def _restore(key: tuple[type, str]) -> None:
    owner, attribute = key
    original = _originals.pop(key)
    replaced = getattr(owner, attribute, None)
    if original is None:
        delattr(owner, attribute)
    else:
        setattr(owner, attribute, original)
    _hook_changes.append((owner, attribute, replaced, getattr(owner, attribute, None)))
    del _patched[key]


def _rebind_hooked_modules() -> None:
    """
    Modules hooked by accelerate (`device_map`, offloading) keep the `forward` their class had when they were hooked,
    bound in `_old_forward`: those of the changed classes are rebound to the class's `forward` as it is now, so that a
    model dispatched before `apply` is protected and one dispatched while applied is reverted too.
    """
    rebind_all_hooked_forwards(_hook_changes)
    _hook_changes.clear()
