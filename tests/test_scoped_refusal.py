"""
A refusal is scoped to what changed: a model family one of whose functions is not the one the patches were written
for is left out whole, loudly (a warning at `apply()`, `status().unprotected`, the self-check, and a warning or error
when a cache crosses a switch through it), while every other family stays protected and exact. An optional part the
release lacks is never an exception out of `apply()`.
"""

import importlib.util
import unittest
import warnings
from unittest import mock

import patches
from patches import targets
from patches.reference import FP32_TOLERANCE, hand_written_loop_errors
from patches.tiny_models import SWITCH_POINT, random_tokens, tiny_phi3_model, tiny_standard_model
from transformers.models.phi3 import modeling_phi3


HAS_PHIMOE = importlib.util.find_spec("transformers.models.phimoe") is not None
HAS_CONTINUOUS_BATCHING = importlib.util.find_spec("transformers.generation.continuous_batching") is not None


def rotary_owner(module) -> type:
    """The class whose `forward` chooses the longrope factors (Phi-3 before 4.48: its scaled rotary embedding)."""
    return getattr(module, "Phi3LongRoPEScaledRotaryEmbedding", None) or next(
        value for name, value in vars(module).items() if name.endswith("RotaryEmbedding")
    )


def with_a_new_parameter(owner: type):
    """`owner.forward` as a release that added a parameter would have it: it works as before, but its signature (and,
    from 4.51, its missing `dynamic_rope_update` decorator) is not what the patches were written for."""
    original = owner.__dict__["forward"]

    def forward(self, *args, layer_type=None, **kwargs):
        return original(self, *args, **kwargs)

    return mock.patch.object(owner, "forward", forward)


def loop_errors(model) -> list[float]:
    tokens = random_tokens(SWITCH_POINT + 6)
    return hand_written_loop_errors(model, tokens, SWITCH_POINT - 4)[0]


class ScopedRefusalTest(unittest.TestCase):
    def setUp(self):
        patches.revert()
        self.addCleanup(patches.revert)

    def apply_expecting_family_left_out(self, family: str, **apply_kwargs) -> patches.PatchStatus:
        with self.assertWarns(patches.UnprotectedPathsWarning) as warned:
            status = patches.apply(**apply_kwargs)
        self.assertIn(f"left {family} as upstream wrote it", str(warned.warning))
        self.assertIn(family, status.unprotected)
        return status

    def test_phi3_changed_leaves_phi3_out_loudly_and_llama_exact(self):
        with with_a_new_parameter(rotary_owner(modeling_phi3)):
            status = self.apply_expecting_family_left_out("phi3")
            self.assertIn("Phi3Model.forward", status.guarded)
            self.assertNotIn("Phi3Model.forward", status.patched)
            self.assertIn("LlamaModel.forward", status.patched)
            self.assertLessEqual(max(loop_errors(tiny_standard_model("llama"))), FP32_TOLERANCE)

            phi3 = tiny_phi3_model()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loop_errors(phi3)
            messages = [
                str(warning.message) for warning in caught if warning.category is patches.StaleRopeCacheWarning
            ]
            self.assertEqual(len(messages), 1, messages)
            self.assertIn("The patches leave phi3 out on this transformers release", messages[0])
            self.assertIn("short", messages[0])

            with self.assertWarns(patches.UnprotectedPathsWarning):
                patches.apply(stale_cache="raise")
            with self.assertRaisesRegex(patches.StaleRopeCacheError, "leave phi3 out"):
                loop_errors(tiny_phi3_model())

    @unittest.skipUnless(HAS_PHIMOE, "this release has no PhiMoE")
    def test_phimoe_changed_leaves_phi3_protected_and_exact(self):
        from transformers.models.phimoe import modeling_phimoe

        with with_a_new_parameter(modeling_phimoe.PhimoeRotaryEmbedding):
            status = self.apply_expecting_family_left_out("phimoe")
            self.assertEqual(list(status.unprotected), ["phimoe"])
            self.assertIn("PhimoeRotaryEmbedding.forward", status.refused)
            self.assertIn("PhimoeModel.forward", status.guarded)
            self.assertIn("Phi3Model.forward", status.patched)
            self.assertLessEqual(max(loop_errors(tiny_phi3_model())), FP32_TOLERANCE)

    def test_a_family_left_out_is_protected_again_once_its_code_is_back(self):
        upstream_forward = modeling_phi3.Phi3Model.__dict__["forward"]
        with with_a_new_parameter(rotary_owner(modeling_phi3)):
            self.apply_expecting_family_left_out("phi3")
            guarded_forward = modeling_phi3.Phi3Model.__dict__["forward"]
            self.assertIsNot(guarded_forward, upstream_forward)
        # The guard is put back before the family's own binding replaces the same attribute
        status = patches.apply()
        self.assertIsNot(modeling_phi3.Phi3Model.__dict__["forward"], guarded_forward)
        self.assertEqual(status.unprotected, {})
        self.assertEqual(status.guarded, [])
        self.assertIn("Phi3Model.forward", status.patched)
        self.assertLessEqual(max(loop_errors(tiny_phi3_model())), FP32_TOLERANCE)
        patches.revert()
        self.assertIs(modeling_phi3.Phi3Model.__dict__["forward"], upstream_forward)

    def test_every_family_refused_raises_and_changes_nothing(self):
        upstream_forward = modeling_phi3.Phi3Model.__dict__["forward"]
        with mock.patch.object(targets, "_family_bindings", side_effect=AttributeError("no such class")):
            with self.assertRaisesRegex(patches.PatchRefusedError, "cannot read its code on this release") as raised:
                patches.apply()
            self.assertIn("Nothing was changed", str(raised.exception))
            self.assertFalse(patches.status().applied)
            self.assertIs(modeling_phi3.Phi3Model.__dict__["forward"], upstream_forward)

            with self.assertWarns(patches.UnprotectedPathsWarning):
                status = patches.apply(force=True)
            self.assertLessEqual(set(targets.MODELS), set(status.unprotected))
            self.assertNotIn("Phi3Model.forward", status.patched)
            self.assertIn("Phi3Model.forward", status.guarded)

    @unittest.skipUnless(HAS_CONTINUOUS_BATCHING, "this release has no continuous batching")
    def test_continuous_batching_it_cannot_read_is_left_out_not_raised(self):
        missing = ModuleNotFoundError("No module named 'transformers.generation.continuous_batching.requests'")
        with mock.patch.object(targets, "_continuous_batching_bindings", side_effect=missing):
            status = self.apply_expecting_family_left_out("continuous batching")
            self.assertIn("ModuleNotFoundError", status.unprotected["continuous batching"])
            self.assertIn("ContinuousBatchingManager.__init__", status.guarded)
            self.assertIn("Phi3Model.forward", status.patched)

    def test_the_self_check_fails_a_family_left_out(self):
        from patches.selfcheck import _families_left_out

        with with_a_new_parameter(rotary_owner(modeling_phi3)):
            self.assertIn("phi3", _families_left_out(force=False))
        self.assertEqual(_families_left_out(force=False), {})
