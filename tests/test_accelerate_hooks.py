"""
Models whose modules accelerate has hooked (`from_pretrained(device_map=...)`): they call the patched functions
however they were loaded, before `patches.apply()` or while applied, and upstream's again after `patches.revert()`.
"""

import functools
import importlib.util
import tempfile
import unittest
from pathlib import Path

import torch

import patches
from patches.hooks import rebind_all_hooked_forwards, rebind_hooked_forwards
from tests.cache_consistency_utils import (
    FP32_TOLERANCE,
    SWITCH_POINT,
    hand_written_loop_errors,
    new_cache,
    random_tokens,
    tiny_phi3_model,
)
from transformers.models.phi3 import modeling_phi3


ACCELERATE_AVAILABLE = importlib.util.find_spec("accelerate") is not None


def fake_hook(module: torch.nn.Module) -> torch.nn.Module:
    """What accelerate's `add_hook_to_module` does to a module's `forward` (a hook that changes nothing)."""
    module._old_forward = module.forward
    new_forward = functools.partial(lambda module, *args, **kwargs: module._old_forward(*args, **kwargs), module)
    module.forward = functools.update_wrapper(new_forward, module._old_forward)
    return module


class RebindHookedForwardsTest(unittest.TestCase):
    """`rebind_hooked_forwards` on toy modules hooked the way accelerate hooks them."""

    def setUp(self):
        class Base(torch.nn.Module):
            def forward(self, x):
                return x + 1

        class Inherits(Base):
            pass

        class Overrides(Base):
            def forward(self, x):
                return x + 2

        self.classes = Base, Inherits, Overrides

    def test_rebinds_the_hooked_modules_that_resolve_to_the_new_function(self):
        base, inherits, overrides = self.classes
        modules = [fake_hook(cls()) for cls in self.classes]
        unhooked = base()
        old_function = base.__dict__["forward"]

        def new_function(self, x):
            return x + 10

        base.forward = new_function
        rebound = rebind_hooked_forwards(base, "forward", old_function, new_function)

        self.assertEqual(sorted(name.split()[0] for name in rebound), ["Base", "Inherits"])
        self.assertEqual([module(torch.zeros(1)).item() for module in modules], [10, 10, 2])
        self.assertEqual(unhooked(torch.zeros(1)).item(), 10)
        for module in modules[:2]:
            self.assertIs(module._old_forward.__func__, new_function)
            self.assertIs(module._old_forward.__self__, module)
            self.assertIs(module.forward.__wrapped__, module._old_forward)
        self.assertIs(modules[2]._old_forward.__func__, overrides.__dict__["forward"])

    def test_patching_and_restoring_a_class_that_only_inherits_the_attribute(self):
        base, inherits, _ = self.classes
        parent, child = fake_hook(base()), fake_hook(inherits())
        resolved = inherits.forward  # what the caller passes as the old function: the inherited one

        def new_function(self, x):
            return x + 10

        inherits.forward = new_function
        self.assertEqual(len(rebind_hooked_forwards(inherits, "forward", resolved, new_function)), 1)
        self.assertEqual([parent(torch.zeros(1)).item(), child(torch.zeros(1)).item()], [1, 10])

        del inherits.forward
        self.assertEqual(len(rebind_hooked_forwards(inherits, "forward", new_function, inherits.forward)), 1)
        self.assertEqual([parent(torch.zeros(1)).item(), child(torch.zeros(1)).item()], [1, 1])
        self.assertIs(child._old_forward.__func__, base.__dict__["forward"])

    def test_rebinds_a_forward_left_behind_by_a_removed_hook(self):
        base, _, _ = self.classes
        module = base()
        module.forward = module.forward  # what `remove_hook_from_module` leaves
        old_function = base.__dict__["forward"]

        def new_function(self, x):
            return x + 10

        base.forward = new_function
        self.assertEqual(len(rebind_hooked_forwards(base, "forward", old_function, new_function)), 1)
        self.assertEqual(module(torch.zeros(1)).item(), 10)

    def test_rebinds_several_changes_in_one_scan(self):
        base, _, _ = self.classes

        class Other(torch.nn.Module):
            def forward(self, x):
                return x + 3

        modules = fake_hook(base()), fake_hook(Other())
        changes = []
        for owner, offset in ((base, 10), (Other, 30)):
            old_function = owner.__dict__["forward"]
            owner.forward = lambda self, x, offset=offset: x + offset
            changes.append((owner, "forward", old_function, owner.__dict__["forward"]))
        self.assertEqual(len(rebind_all_hooked_forwards(changes)), 2)
        self.assertEqual([module(torch.zeros(1)).item() for module in modules], [10, 30])

    def test_a_subclass_changed_in_the_same_scan_as_its_base_gets_its_own_function(self):
        base, inherits, _ = self.classes
        parent, child = fake_hook(base()), fake_hook(inherits())
        changes = []
        for owner, offset in ((base, 10), (inherits, 20)):
            old_function = owner.forward  # resolved as the caller does, one change after the other
            owner.forward = lambda self, x, offset=offset: x + offset
            changes.append((owner, "forward", old_function, owner.__dict__["forward"]))
        self.assertEqual(len(rebind_all_hooked_forwards(changes)), 2)
        self.assertEqual([parent(torch.zeros(1)).item(), child(torch.zeros(1)).item()], [10, 20])

    def test_leaves_other_attributes_and_owners_alone(self):
        base, _, _ = self.classes
        module = fake_hook(base())
        old_function = base.__dict__["forward"]
        self.assertEqual(rebind_hooked_forwards(base, "extra_repr", old_function, lambda self: ""), [])
        self.assertEqual(rebind_hooked_forwards(modeling_phi3, "forward", old_function, lambda self, x: x), [])
        self.assertIs(module._old_forward.__func__, old_function)


@unittest.skipUnless(ACCELERATE_AVAILABLE, "accelerate is not installed: no `device_map` dispatch to test")
class AccelerateHooksTest(unittest.TestCase):
    """A tiny longrope Phi-3 loaded with every module offloaded to disk (`device_map=...`): every module hooked."""

    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.TemporaryDirectory()
        cls.addClassCleanup(cls.directory.cleanup)
        model = tiny_phi3_model()
        model.save_pretrained(Path(cls.directory.name) / "model")
        cls.module_classes = {type(module) for module in model.modules()}

    def setUp(self):
        patches.revert()
        self.addCleanup(patches.revert)
        # The `forward` each module class of the model resolves to upstream
        self.upstream = {owner: owner.forward for owner in self.module_classes}

    def load_offloaded(self):
        directory = Path(self.directory.name)
        model = modeling_phi3.Phi3ForCausalLM.from_pretrained(
            directory / "model",
            # Every module on disk; written per submodule, since 4.50 refuses `{"": "disk"}` ("device disk is invalid")
            device_map={"model": "disk", "lm_head": "disk"},
            offload_folder=directory / "offload",
            # The attention classes of the saved model (before 4.48 each implementation has its own class)
            attn_implementation="eager",
        ).eval()
        hooked = [module for module in model.modules() if "_old_forward" in vars(module)]
        self.assertIn(model, hooked, "from_pretrained(device_map=...) no longer hooks the model")
        self.assertIn(model.model, hooked)
        return model, hooked

    def assertCallsTheClassForward(self, hooked):
        """Every hooked module calls its class's `forward` as it is now, bound to itself."""
        for module in hooked:
            self.assertIs(module._old_forward.__func__, type(module).forward, type(module).__name__)
            self.assertIs(module._old_forward.__self__, module)

    def loop_errors(self, model):
        tokens = random_tokens(SWITCH_POINT + 8)
        cache = new_cache("dynamic", model.config)
        return hand_written_loop_errors(model, tokens, SWITCH_POINT - 4, past_key_values=cache)[0]

    def test_model_loaded_before_apply_is_patched(self):
        model, hooked = self.load_offloaded()
        self.assertGreater(max(self.loop_errors(model)), 0.1, "upstream's loop must be stale for this test to fail")

        with patches.applied():
            for owner in (modeling_phi3.Phi3ForCausalLM, modeling_phi3.Phi3Model):
                self.assertIsNot(owner.forward, self.upstream[owner], f"{owner.__name__}.forward is not patched")
            self.assertCallsTheClassForward(hooked)
            errors = self.loop_errors(model)
        self.assertLessEqual(max(errors), FP32_TOLERANCE, f"max |Δlogit| per step: {errors}")

        for module in hooked:
            self.assertIs(module._old_forward.__func__, self.upstream[type(module)], type(module).__name__)

    def test_model_loaded_while_applied_is_unpatched_by_revert(self):
        with patches.applied():
            model, hooked = self.load_offloaded()
            errors = self.loop_errors(model)
        self.assertLessEqual(max(errors), FP32_TOLERANCE, f"max |Δlogit| per step: {errors}")

        for module in hooked:
            self.assertIs(module._old_forward.__func__, self.upstream[type(module)], type(module).__name__)
        self.assertGreater(max(self.loop_errors(model)), 0.1, "after revert, the loop must be upstream's (stale)")


if __name__ == "__main__":
    unittest.main()
