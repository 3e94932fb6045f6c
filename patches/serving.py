"""
`transformers serve` where it decodes in processes of its own. From 5.25 the server loads each model in a process it
starts with the `spawn` context (`EngineClient.start_process`), a fresh interpreter that never ran `patches.apply()`:
every request would be decoded by upstream's code. The patches make that process's target apply them first, with
the options the server's process applied them with, then run upstream's target.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class RunInPatchedProcess:
    """
    The target of a spawned process: applies the patches there, then runs `owner.attribute`, the staticmethod as
    upstream defines it, with the target's arguments. It is pickled by value (the class and these fields), so the
    spawned process imports it from `patches` without the server's patched classes.

    Args:
        owner_module: the module of the class whose staticmethod the process runs.
        owner_name: that class.
        attribute: the staticmethod.
        stale_cache: the stale-cache policy per RoPE type the server's process applied.
        consistent: whether it applied consistent mode.
    """

    owner_module: str
    owner_name: str
    attribute: str
    stale_cache: tuple[tuple[str, str], ...]
    consistent: bool

    def __call__(self, *args):
        import importlib

        import patches

        # `force`: the server's process has already accepted this release (or been told to patch it anyway), and the
        # spawned one runs the same transformers
        patches.apply(stale_cache=dict(self.stale_cache), force=True, consistent=self.consistent)
        owner = getattr(importlib.import_module(self.owner_module), self.owner_name)
        # As upstream defines it: `apply()` has just replaced it here too
        upstream_target = patches._upstream_attribute(owner, self.attribute)
        return upstream_target.__func__(*args)


def run_in_patched_process(owner: type, attribute: str, stale_cache: dict[str, str], consistent: bool):
    """The replacement of the staticmethod `owner.attribute`, a spawned process's target: the same target, run once
    the patches are applied in that process with `stale_cache` and `consistent`."""
    target = RunInPatchedProcess(
        owner_module=owner.__module__,
        owner_name=owner.__qualname__,
        attribute=attribute,
        stale_cache=tuple(sorted(stale_cache.items())),
        consistent=consistent,
    )
    return staticmethod(target)
