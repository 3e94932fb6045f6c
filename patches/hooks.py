"""
Keeping modules that accelerate has hooked in step with the patched (or restored) classes.

accelerate's `add_hook_to_module`, which `from_pretrained(device_map=...)`, `dispatch_model` and `cpu_offload` use,
stores the module's bound `forward` in `module._old_forward` and calls that from an instance attribute
`module.forward`. A bound method holds the function it was bound to, so such a module keeps calling the class's
`forward` of the time it was hooked: a model dispatched before `patches.apply()` would silently keep upstream's stale
cache, and one dispatched while applied would keep the replacement after `patches.revert()`. The hooks are found by
that `_old_forward` attribute, so accelerate itself is never imported.
"""

import gc
import types
from itertools import compress, repeat
from operator import is_

import torch


def rebind_hooked_forwards(owner: type, attribute: str, old_function, new_function) -> list[str]:
    """
    Rebinds the hooked modules of `owner` that still call `old_function` to `new_function`, once the class's
    `attribute` has been changed from one to the other (under the caller's lock). Scans the live objects once (tens of
    milliseconds): `rebind_all_hooked_forwards` does several changes in one scan.

    Args:
        owner: the class whose attribute was replaced (or restored); other owners (Python modules) are left alone.
        attribute: the attribute's name; only `"forward"`, the one accelerate hooks, is rebound.
        old_function: the plain function `owner` resolved `attribute` to before the change (inherited or its own).
        new_function: the plain function it resolves to now.

    Returns:
        One description (class name and id) per rebound module.
    """
    return rebind_all_hooked_forwards([(owner, attribute, old_function, new_function)])


def rebind_all_hooked_forwards(changes) -> list[str]:
    """
    `rebind_hooked_forwards` for each `(owner, attribute, old_function, new_function)` of `changes`, in one scan. A
    hooked module calling one of the old functions is rebound to what its class resolves to now, if that is one of the
    new functions: so a subclass changed in the same batch as its base gets its own new function.
    """
    owners: dict[int, tuple[object, list[type]]] = {}  # by the old function's id: (old function, owners)
    new_functions = set()
    for owner, attribute, old_function, new_function in changes:
        if attribute == "forward" and isinstance(owner, type) and old_function not in (None, new_function):
            owners.setdefault(id(old_function), (old_function, []))[1].append(owner)
            new_functions.add(id(new_function))
    if not owners:
        return []
    rebound = []
    # The bound methods among the live objects, picked out in C, in one pass (tens of milliseconds, however many
    # functions changed: `gc.get_referrers` would compare every reference it scans with each old function)
    live = gc.get_objects()
    for method in compress(live, map(is_, map(type, live), repeat(types.MethodType))):
        if id(method.__func__) not in owners or not isinstance(method.__self__, torch.nn.Module):
            continue
        module = method.__self__
        old_function, changed_owners = owners.get(id(method.__func__), (None, ()))
        # A subclass with its own `forward` does not resolve to a new function and keeps its hook as it is
        new_function = getattr(type(module), "forward", None)
        if (
            old_function is not method.__func__
            or id(new_function) not in new_functions
            or not isinstance(module, tuple(changed_owners))
        ):
            continue
        state = vars(module)
        if state.get("_old_forward") is method:
            state["_old_forward"] = new_function.__get__(module)
            hooked_forward = state.get("forward")
            # `functools.update_wrapper` made the hook's `__wrapped__` the old method: `inspect.signature` follows it
            if getattr(hooked_forward, "__wrapped__", None) is method:
                hooked_forward.__wrapped__ = state["_old_forward"]
        elif state.get("forward") is method:
            # `remove_hook_from_module` leaves the bound method behind as the instance's `forward`
            state["forward"] = new_function.__get__(module)
        else:
            continue
        rebound.append(f"{type(module).__name__} at {id(module):#x}")
    return rebound
