"""
Under `"recompute"`, a hand-written loop stays exact when it crops its cache back (a rollback, as speculative decoding
does) to below the switch or to any earlier length, and a recompute that raises half-way loses nothing: the same step
run again recomputes the cache exactly.
"""

import unittest

import torch
from parameterized import parameterized

import patches
from patches.reference import CACHE_KEYWORD, FP32_TOLERANCE, decode_on_errors
from patches.tiny_models import SWITCH_POINT, new_cache, random_tokens, tiny_phi3_model, tiny_standard_model


TOKENS = random_tokens(SWITCH_POINT + 8)


def decode(model, cache, start: int, stop: int) -> list[float]:
    """Feeds `TOKENS[:, start:stop]` one at a time through `cache`: max |Δlogit| of each step against no cache."""
    return decode_on_errors(model, TOKENS, cache, start, stop)


def prefilled(model, length: int):
    cache = new_cache("dynamic", model.config)
    model(TOKENS[:, :length], **{CACHE_KEYWORD: cache}, use_cache=True)
    return cache


def crop(cache, length: int) -> None:
    """`DynamicCache.crop` back to `length` tokens, by the count of tokens removed (what every release accepts)."""
    cache.crop(length - cache.get_seq_length())


MODELS = {"phi3": tiny_phi3_model, "llama": lambda: tiny_standard_model("llama")}


class RollbackTest(unittest.TestCase):
    def setUp(self):
        patches.apply()
        self.addCleanup(patches.revert)

    @parameterized.expand(
        [
            ("phi3_below_the_switch", "phi3", SWITCH_POINT - 4),
            ("phi3_at_the_switch", "phi3", SWITCH_POINT),
            ("phi3_past_the_switch", "phi3", SWITCH_POINT + 2),
            ("llama_below_the_switch", "llama", SWITCH_POINT - 4),
        ]
    )
    @torch.no_grad()
    def test_crop_back_and_decode_on_is_exact(self, _, family, crop_to):
        model = MODELS[family]()
        cache = prefilled(model, SWITCH_POINT - 4)
        errors = decode(model, cache, SWITCH_POINT - 4, SWITCH_POINT + 6)
        crop(cache, crop_to)
        self.assertEqual(cache.get_seq_length(), crop_to)
        errors += decode(model, cache, crop_to, SWITCH_POINT + 8)
        self.assertLessEqual(max(errors), FP32_TOLERANCE)

    @torch.no_grad()
    def test_two_crops_in_a_row(self):
        model = tiny_phi3_model()
        cache = prefilled(model, SWITCH_POINT - 4)
        decode(model, cache, SWITCH_POINT - 4, SWITCH_POINT + 6)
        crop(cache, SWITCH_POINT + 1)
        crop(cache, SWITCH_POINT - 6)
        self.assertLessEqual(max(decode(model, cache, SWITCH_POINT - 6, SWITCH_POINT + 4)), FP32_TOLERANCE)

    @torch.no_grad()
    def test_a_reordered_cache_is_not_taken_for_a_crop(self):
        # A reorder makes new tensors: what the cache holds is unknown, so a recompute across the switch is refused
        model = tiny_phi3_model()
        cache = prefilled(model, SWITCH_POINT - 2)
        cache.reorder_cache(torch.tensor([0]))
        with self.assertRaisesRegex(patches.StaleRopeCacheError, "cannot be recomputed"):
            decode(model, cache, SWITCH_POINT - 2, SWITCH_POINT + 2)


class FailedRecomputeTest(unittest.TestCase):
    def setUp(self):
        patches.apply()
        self.addCleanup(patches.revert)

    @parameterized.expand([("keyboard_interrupt", KeyboardInterrupt), ("runtime_error", RuntimeError)])
    @torch.no_grad()
    def test_the_step_run_again_recomputes_exactly(self, _, failure):
        model = tiny_phi3_model()
        cache = prefilled(model, SWITCH_POINT - 2)
        errors = decode(model, cache, SWITCH_POINT - 2, SWITCH_POINT)
        layer = model.model.layers[-1]
        calls = []

        def failing_forward(*args, **kwargs):
            calls.append(1)
            raise failure("injected in the last layer, half-way through the recompute")

        layer.forward = failing_forward
        with self.assertRaises(failure):
            decode(model, cache, SWITCH_POINT, SWITCH_POINT + 1)  # the step that crosses the switch
        del layer.forward
        self.assertEqual(len(calls), 1)
        errors += decode(model, cache, SWITCH_POINT, SWITCH_POINT + 6)
        self.assertLessEqual(max(errors), FP32_TOLERANCE)
