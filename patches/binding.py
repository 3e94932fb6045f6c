"""Replacing attributes of installed transformers classes, and putting the originals back."""

import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Binding:
    """
    One attribute of an installed class replaced by code from `modeling_overrides`.

    Args:
        name: how `status()` names it, e.g. `"Phi3ForCausalLM.forward"`.
        owner: the class whose attribute is replaced.
        attribute: the attribute's name.
        replacement: builds the new attribute from the original one.
        check: returns why the original is not the function the replacement was written for, or `None` if it is.
    """

    name: str
    owner: type
    attribute: str
    replacement: Callable[[object], object]
    check: Callable[[object], str | None]


def original_attribute(owner: type, attribute: str):
    """The attribute exactly as the class holds it (no descriptor binding), or `None` if it only inherits it."""
    return owner.__dict__.get(attribute)


def with_super_of(function: types.FunctionType, owner: type) -> types.FunctionType:
    """
    Returns `function` with its zero-argument `super()` resolved from `owner`. The override methods are written in
    classes of their own; bound onto the installed class, `super()` must start from that class instead.
    """
    if "__class__" not in function.__code__.co_freevars:
        return function
    closure = tuple(
        types.CellType(owner) if name == "__class__" else cell
        for name, cell in zip(function.__code__.co_freevars, function.__closure__)
    )
    rebound = types.FunctionType(
        function.__code__, function.__globals__, function.__name__, function.__defaults__, closure
    )
    rebound.__kwdefaults__ = function.__kwdefaults__
    rebound.__dict__.update(function.__dict__)
    rebound.__qualname__ = f"{owner.__qualname__}.{function.__name__}"
    rebound.__doc__ = function.__doc__
    rebound.__module__ = function.__module__
    return rebound


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
