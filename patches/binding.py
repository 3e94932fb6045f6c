"""Replacing attributes of installed transformers classes, and putting the originals back."""

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Binding:
    """
    One attribute of an installed class (or module) replaced by the patches' code.

    Args:
        name: how `status()` names it, e.g. `"Phi3ForCausalLM.forward"`.
        owner: the class (or module) whose attribute is replaced.
        attribute: the attribute's name.
        replacement: builds the new attribute from the original one.
        check: returns why the original is not the function the replacement was written for, or `None` if it is.
        family: what it protects, as `apply()` leaves it out whole when one of its bindings is refused: a model's
            modeling module (`"phi3"`), `"continuous batching"` or `"consistent decoding"`.
        guard: it protects nothing, only warns: what a left-out family gets (see `patches/unprotected.py`).
    """

    name: str
    owner: type
    attribute: str
    replacement: Callable[[object], object]
    check: Callable[[object], str | None]
    family: str = ""
    guard: bool = False


def original_attribute(owner: type, attribute: str):
    """The attribute exactly as the class holds it (no descriptor binding), or `None` if it only inherits it."""
    return owner.__dict__.get(attribute)


@functools.cache
def _cached_source(function) -> str:
    return inspect.getsource(function)


def source(function) -> str:
    """
    The source of `function` once its decorators are unwrapped, read once per function object (`apply()` checks the
    same upstream functions each time it is called). Raises `OSError` or `TypeError` where it cannot be read.
    """
    function = inspect.unwrap(function)
    try:
        return _cached_source(function)
    except TypeError:  # not hashable: read it each time
        return inspect.getsource(function)


def parameter_names(function) -> list[str]:
    """Parameter names of `function` once its decorators are unwrapped."""
    return list(inspect.signature(inspect.unwrap(function)).parameters)


def expect_parameters(expected: list[str]) -> Callable[[object], str | None]:
    """A `Binding.check` accepting functions whose unwrapped signature has exactly the `expected` parameters."""

    def check(original) -> str | None:
        if original is None:
            return "the class does not define it"
        found = parameter_names(original)
        if found != expected:
            return f"its signature changed: expected parameters {expected}, found {found}"
        return None

    return check


def expect_leading_parameters(expected: list[str]) -> Callable[[object], str | None]:
    """A `Binding.check` accepting functions whose unwrapped signature starts with the `expected` parameters."""

    def check(original) -> str | None:
        if original is None:
            return "the class does not define it"
        found = parameter_names(original)
        if found[: len(expected)] != expected:
            return f"its signature changed: expected parameters starting with {expected}, found {found}"
        return None

    return check


def expect_source(*fragments: str, absent: tuple[str, ...] = ()) -> Callable[[object], str | None]:
    """
    A `Binding.check` accepting functions whose source (decorators unwrapped) contains every one of `fragments` and
    none of `absent`: a fingerprint of the upstream code the replacement was written against.
    """

    def check(original) -> str | None:
        if original is None:
            return "the class does not define it"
        try:
            text = source(original)
        except (OSError, TypeError):
            return "its source code cannot be read, so it cannot be checked"
        missing = [fragment for fragment in fragments if fragment not in text]
        if missing:
            return f"its code changed: it no longer contains {missing}"
        present = [fragment for fragment in absent if fragment in text]
        if present:
            return f"its code changed: it now contains {present}"
        return None

    return check


def all_checks(*checks: Callable[[object], str | None]) -> Callable[[object], str | None]:
    """A `Binding.check` that passes when every one of `checks` does, and otherwise reports the first failure."""

    def check(original) -> str | None:
        return next((reason for reason in (check(original) for check in checks) if reason is not None), None)

    return check
