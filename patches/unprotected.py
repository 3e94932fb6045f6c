"""
What the patches put where they cannot protect: a warning (or, under `"raise"`, an error) when decoding goes through
it across a RoPE switch, so that a path left out is never silently stale.

`apply()` leaves out a whole model family when one of its functions is not the one the patches were written for (a
newer release, say), and continuous batching where the release's is not the one they protect. What stays is
upstream's code, wrapped only to say so: a left-out model's decoder `forward` (whatever its signature) and
`ContinuousBatchingManager.__init__`.
"""

import functools
import inspect
import warnings

from .rope_cache_utils import (
    CACHE_ARGUMENT_NAMES,
    StaleRopeCacheError,
    StaleRopeCacheWarning,
    caller_stacklevel,
    enforced_stale_cache_policy,
    rope_frequency_regime,
    tokens_in_cache,
)


def _new_token_count(arguments: dict) -> int:
    """How many tokens a forward pass adds to the cache, from its `input_ids` or `inputs_embeds` (0 if neither)."""
    for name in ("input_ids", "inputs_embeds"):
        tensor = arguments.get(name)
        if tensor is not None:
            return tensor.shape[1] if tensor.dim() > 1 else tensor.shape[0]
    return 0


def _passed_cache(arguments: dict):
    return next((arguments[name] for name in CACHE_ARGUMENT_NAMES if arguments.get(name) is not None), None)


def _stale_cache_message(family: str, reason: str, cached: int, total: int, regime, new_regime) -> str:
    return (
        f"The patches leave {family} out on this transformers release ({reason}), so its KV cache is not protected: "
        f"it holds {cached} tokens computed with the {regime} RoPE frequencies, and the sequence is now {total} "
        f"tokens long and needs the {new_regime} ones. The outputs will differ from a forward pass without cache. "
        "Run `python -m patches check`, and use a transformers release the patches cover for this model."
    )


def warn_across_rope_switch(decoder_forward, family: str, reason: str):
    """
    Wraps the decoder `forward` of a model family `apply()` left out (for `reason`): a forward pass that extends a
    cache filled in another RoPE regime warns once per model with a `StaleRopeCacheWarning`, or raises a
    `StaleRopeCacheError` under the `"raise"` policy, before it runs. Upstream's `forward` runs unchanged, with
    whatever arguments it takes (the wrapper reads them by name from its signature).
    """
    signature = inspect.signature(decoder_forward)

    @functools.wraps(decoder_forward)
    def guarded_forward(self, *args, **kwargs):
        policy = enforced_stale_cache_policy(self.config)
        if policy is not None:
            try:
                arguments = signature.bind(self, *args, **kwargs).arguments
            except TypeError:  # upstream's own error for these arguments, raised by upstream's forward below
                arguments = {}
            arguments = {**arguments, **arguments.get("kwargs", {})}
            cache = _passed_cache(arguments)
            cached = tokens_in_cache(cache) if cache is not None else 0
            if cached > 0:
                total = cached + _new_token_count(arguments)
                regime, new_regime = (
                    rope_frequency_regime(self.config, cached),
                    rope_frequency_regime(self.config, total),
                )
                if regime != new_regime:
                    message = _stale_cache_message(family, reason, cached, total, regime, new_regime)
                    if policy == "raise":
                        raise StaleRopeCacheError(message)
                    if not getattr(self, "_unprotected_rope_cache_warned", False):
                        self._unprotected_rope_cache_warned = True
                        warnings.warn(message, StaleRopeCacheWarning, stacklevel=caller_stacklevel())
        return decoder_forward(self, *args, **kwargs)

    return guarded_forward


def warn_in_unprotected_continuous_batching(manager_init):
    """Decorates `ContinuousBatchingManager.__init__` where the patches do not protect continuous batching: a model
    whose RoPE frequencies depend on the length is warned about, once per manager."""

    @functools.wraps(manager_init)
    def wrapper(self, model, *args, **kwargs):
        manager_init(self, model, *args, **kwargs)
        if rope_frequency_regime(model.config, 1) is not None:
            warnings.warn(
                "continuous batching on this transformers release is not protected by the patches: packed requests "
                "share the RoPE frequencies of the longest one, and a request that crosses the switch keeps stale "
                "blocks. Decode such a model with `generate()` or a loop of your own for exact results.",
                StaleRopeCacheWarning,
                stacklevel=2,
            )

    return wrapper
