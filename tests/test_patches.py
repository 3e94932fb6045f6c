"""Testing the `patches` API: apply, revert, status, applied, the version gate and the per-function checks."""

import importlib.util
import threading
import unittest
from pathlib import Path
from unittest import mock

import tomllib
from packaging.version import Version

import patches
from patches import versions
from transformers.models.phi3 import modeling_phi3


def rotary_attributes() -> list[tuple[type, str]]:
    """Where each era of upstream chooses the longrope factors (the README's release table)."""
    version = versions.installed_version()
    if version < Version("4.48"):
        return [(modeling_phi3.Phi3LongRoPEScaledRotaryEmbedding, "forward")]
    return [(modeling_phi3.Phi3RotaryEmbedding, "forward")]


ROTARY_ATTRIBUTES = rotary_attributes()
CACHE_ATTRIBUTES = [
    (modeling_phi3.Phi3Model, "forward"),
    (modeling_phi3.Phi3ForCausalLM, "forward"),
    (modeling_phi3.Phi3ForCausalLM, "prepare_inputs_for_generation"),
]
PATCHED_ATTRIBUTES = ROTARY_ATTRIBUTES + CACHE_ATTRIBUTES


def binding_name(owner: type, attribute: str) -> str:
    return f"{owner.__name__}.{attribute}"


def snapshot():
    return {(owner, name): owner.__dict__.get(name) for owner, name in PATCHED_ATTRIBUTES}


class PatchesApiTest(unittest.TestCase):
    def setUp(self):
        patches.revert()
        self.originals = snapshot()
        self.addCleanup(patches.revert)

    def test_apply_replaces_and_revert_restores_the_very_same_objects(self):
        patches.apply()
        patched = snapshot()
        for key, original in self.originals.items():
            self.assertIsNot(patched[key], original, key)
        patches.revert()
        for key, original in snapshot().items():
            self.assertIs(original, self.originals[key], key)

    def test_apply_is_idempotent(self):
        first = patches.apply()
        after_first = snapshot()
        second = patches.apply()
        for key, value in snapshot().items():
            self.assertIs(value, after_first[key], key)
        self.assertEqual(first, second)
        patches.revert()
        self.assertEqual(snapshot(), self.originals)

    def test_apply_from_several_threads(self):
        barrier = threading.Barrier(8)
        errors = []

        def worker():
            try:
                barrier.wait()
                patches.apply()
            except Exception as error:  # pragma: no cover - reported below
                errors.append(error)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        self.assertEqual(patches.status().patched, patches.apply().patched)
        for key in PATCHED_ATTRIBUTES:
            self.assertIn(binding_name(*key), patches.status().patched)
        patches.revert()
        for key, original in snapshot().items():
            self.assertIs(original, self.originals[key], key)

    def test_status_reports_version_policy_and_patched_functions(self):
        status = patches.status()
        self.assertFalse(status.applied)
        self.assertEqual(status.patched, [])
        status = patches.apply(stale_cache="warn")
        self.assertTrue(status.applied)
        self.assertEqual(status.stale_cache, {"longrope": "warn", "dynamic": "warn"})
        for key in PATCHED_ATTRIBUTES:
            self.assertIn(binding_name(*key), status.patched)
        self.assertIn("LlamaModel.forward", status.patched)
        self.assertEqual(status.refused, {})
        self.assertEqual(status.transformers_version, str(versions.installed_version()))
        self.assertIn("stale_cache: {'longrope': 'warn', 'dynamic': 'warn'}", str(status))

    def test_changing_policy_to_ignore_unbinds_the_causal_lm(self):
        patches.apply()
        status = patches.apply(stale_cache="ignore")
        # Only frequency updates stay: every cache binding (decoders, causal LMs, generation) is undone
        for key in ROTARY_ATTRIBUTES:
            self.assertIn(binding_name(*key), status.patched)
        self.assertEqual([name for name in status.patched if "Model." in name or "CausalLM." in name], [])
        for key in CACHE_ATTRIBUTES:
            self.assertIs(snapshot()[key], self.originals[key], key)

    def test_status_names_the_models_left_out_and_why(self):
        from patches.coverage import LEFT_OUT_MODELS, MODELS

        status = patches.apply()
        for module_name, reason in status.left_out.items():
            self.assertTrue(reason, module_name)
            self.assertIn(f"left out {module_name} (stale across a switch, as upstream): {reason}", str(status))
            if module_name in MODELS:  # a covered model left out on this release is not partly patched either
                prefix = MODELS[module_name].prefix
                self.assertEqual([name for name in status.patched if name.startswith(f"{prefix}Model.")], [])
        for module_name in LEFT_OUT_MODELS:
            if importlib.util.find_spec(f"transformers.models.{module_name}") is not None:
                self.assertIn(module_name, status.left_out)
        self.assertEqual(patches.revert().left_out, {})

    def test_status_reports_the_policy_in_force_whoever_set_it(self):
        from patches.rope_cache_utils import set_stale_cache_policy

        patches.apply()
        set_stale_cache_policy({"longrope": "raise"})
        self.assertEqual(patches.status().stale_cache, {"longrope": "raise", "dynamic": "warn"})
        patches.revert()
        self.assertEqual(patches.status().stale_cache, patches.DEFAULT_STALE_CACHE_POLICIES)

    def test_applied_context_restores_the_previous_state(self):
        with patches.applied(stale_cache="raise") as status:
            self.assertEqual(status.stale_cache, {"longrope": "raise", "dynamic": "raise"})
        self.assertFalse(patches.status().applied)
        self.assertEqual(snapshot(), self.originals)

        patches.apply(stale_cache="warn")
        with patches.applied(stale_cache="raise"):
            pass
        self.assertEqual(patches.status().stale_cache, {"longrope": "warn", "dynamic": "warn"})

    def test_unsupported_version_is_refused_and_nothing_changes(self):
        newest = Version(versions.NEWEST_TESTED_VERSION)
        for version in ("4.30.0", f"{newest.major}.{newest.minor + 1}.0", "6.1.0"):
            with mock.patch.object(versions, "installed_version", return_value=Version(version)):
                with self.assertRaises(patches.UnsupportedTransformersVersionError) as raised:
                    patches.apply()
                self.assertIn(version, str(raised.exception))
                self.assertIn(versions.supported_range(), str(raised.exception))
            self.assertEqual(snapshot(), self.originals)

    def test_force_patches_an_unsupported_version(self):
        with mock.patch.object(versions, "installed_version", return_value=Version("6.1.0")):
            status = patches.apply(force=True)
        self.assertTrue(status.applied)
        self.assertFalse(status.version_supported)

    def test_a_changed_upstream_function_leaves_its_family_out_and_warns_once(self):
        def forward(self, input_ids, something_new=None):  # not the function the patch was written for
            return None

        with mock.patch.object(modeling_phi3.Phi3ForCausalLM, "forward", forward):
            with self.assertWarns(patches.UnprotectedPathsWarning) as warned:
                status = patches.apply()
            self.assertIn("`Phi3ForCausalLM.forward`: its signature changed", str(warned.warning))
            self.assertIn("left phi3 as upstream wrote it", str(warned.warning))
            self.assertEqual(warned.filename, __file__)
            self.assertIs(modeling_phi3.Phi3ForCausalLM.__dict__["forward"], forward)
            self.assertIn("signature changed", status.refused["Phi3ForCausalLM.forward"])
            self.assertIn("phi3", status.unprotected)
            # The whole family is left out, its decoder only guarded; the other families are patched
            for owner, attribute in PATCHED_ATTRIBUTES:
                self.assertNotIn(binding_name(owner, attribute), status.patched)
            self.assertEqual(
                modeling_phi3.Phi3ForCausalLM.__dict__["prepare_inputs_for_generation"],
                self.originals[CACHE_ATTRIBUTES[2]],
            )
            self.assertIn("Phi3Model.forward", status.guarded)
            self.assertIn("LlamaModel.forward", status.patched)
            self.assertIn("applied: PARTIALLY (1 left out, their paths unprotected: phi3)", str(status))
            patches.revert()
            self.assertIs(modeling_phi3.Phi3ForCausalLM.__dict__["forward"], forward)
            self.assertEqual(patches.status().guarded, [])
        self.assertEqual(snapshot(), self.originals)

    def test_a_function_whose_code_changed_is_refused_by_its_fingerprint(self):
        # Same signature as upstream's, other code: only the source fingerprint tells them apart
        def changed_legacy_rotary_forward(self, x, position_ids, seq_len=None):
            return None

        def changed_rotary_forward(self, x, position_ids):
            return None

        version = versions.installed_version()
        if version >= Version("4.51"):
            self.skipTest("from 4.51 the rotary `forward` is recognised by its `dynamic_rope_update` decorator")
        owner, attribute = ROTARY_ATTRIBUTES[0]
        changed = changed_legacy_rotary_forward if version < Version("4.48") else changed_rotary_forward
        with mock.patch.object(owner, attribute, changed):
            with self.assertWarns(patches.UnprotectedPathsWarning):
                status = patches.apply()
            self.assertIs(owner.__dict__[attribute], changed)
            self.assertIn("its code changed", status.refused[binding_name(owner, attribute)])
            self.assertNotIn(binding_name(owner, attribute), status.patched)
            self.assertIn("phi3", status.unprotected)
            patches.revert()

    def test_the_tested_range_is_the_packaged_requirement(self):
        # One source: patches/requirements.txt, which pyproject.toml reads for the dependencies
        pyproject = tomllib.loads(Path(__file__).parent.parent.joinpath("pyproject.toml").read_text(encoding="utf-8"))
        self.assertEqual(
            pyproject["tool"]["setuptools"]["dynamic"]["dependencies"], {"file": ["patches/requirements.txt"]}
        )
        specifier = versions.supported_specifier()
        for release in versions.TESTED_VERSIONS:
            self.assertTrue(versions.is_supported(Version(release)), release)
        oldest, newest = Version(versions.TESTED_VERSIONS[0]), Version(versions.NEWEST_TESTED_VERSION)
        self.assertNotIn(f"{oldest.major}.{oldest.minor}.{oldest.micro - 1}", specifier)
        self.assertIn(f"{newest.major}.{newest.minor}.99", specifier)
        self.assertNotIn(f"{newest.major}.{newest.minor + 1}.0", specifier)
        self.assertEqual(versions.supported_range(), f">={oldest},<{newest.major}.{newest.minor + 1}")

    def test_bad_arguments_are_refused_with_what_is_accepted(self):
        for arguments, error, message in (
            ({"consistent": "no"}, TypeError, "`consistent` must be `True` or `False`, got 'no'"),
            ({"force": 1}, TypeError, "`force` must be `True` or `False`, got 1"),
            ({"stale_cache": {1: "warn"}}, ValueError, r"names RoPE types \[1\]"),
            ({"stale_cache": {"yarn": "warn"}}, ValueError, r"names RoPE types \['yarn'\]"),
            ({"stale_cache": "sometimes"}, ValueError, "Unknown stale-cache policy 'sometimes'"),
            ({"stale_cache": ["warn"]}, ValueError, "must be one of"),
        ):
            with self.subTest(**{name: repr(value) for name, value in arguments.items()}):
                with self.assertRaisesRegex(error, message):
                    patches.apply(**arguments)
                self.assertFalse(patches.status().applied)
                self.assertEqual(snapshot(), self.originals)

    def test_import_patches_auto_applies_defaults(self):
        import importlib

        import patches.auto

        importlib.reload(patches.auto)
        status = patches.status()
        self.assertTrue(status.applied)
        self.assertEqual(status.stale_cache, patches.DEFAULT_STALE_CACHE_POLICIES)
        self.assertEqual(status.stale_cache, {"longrope": "recompute", "dynamic": "warn"})
