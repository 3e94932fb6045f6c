# Copyright 2026 The HuggingFace Team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
The upstream pull-request diff, verified: made from `modeling_overrides/` against a pristine tree of the installed
release, applied with `git apply`, checked as upstream's CI would, and its tests run against the patched transformers
with the run-time patches not imported. No network.
"""

import ast
import shutil
import tempfile
import textwrap
import unittest
from pathlib import Path

from packaging.version import Version

from modeling_overrides import modeling_rope_utils, rope_cache_utils
from patches import versions
from patches.coverage import MODELS, pull_request_models
from patches.targets import covered_model
from upstream_pr.description import describe
from upstream_pr.diff import build_pristine_tree, planned_texts, unified_diff
from upstream_pr.plan import (
    OVERRIDES,
    SUPPORTED_RELEASES,
    UnrecognisedTreeError,
    _unquoted_annotations,
    drops_cache_at_switch,
    is_supported_tree,
    make_plan,
    member_source,
)
from upstream_pr.pr_tests import CONTINUOUS_BATCHING_TESTS, merge_test_module, pr_test_modules
from upstream_pr.source_edits import (
    AddImportFrom,
    InsertAfterStatement,
    MoveFrequencyUpdateToDecorator,
    RemoveMethod,
    RemoveUnusedImport,
    function_source,
)
from upstream_pr.verify import verify

from .cache_consistency_utils import TRANSFORMERS_VERSION


MADE_FOR_INSTALLED_RELEASE = is_supported_tree(TRANSFORMERS_VERSION)


class PullRequestDiffTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.workdir = Path(tempfile.mkdtemp(prefix="pr-diff-"))
        cls.tree = build_pristine_tree(cls.workdir / "pristine")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.workdir, ignore_errors=True)

    def test_refuses_a_tree_it_does_not_recognise(self):
        with self.assertRaisesRegex(UnrecognisedTreeError, "not a transformers source tree"):
            make_plan(self.workdir)
        older = self.workdir / "older"
        (older / "src" / "transformers").mkdir(parents=True)
        (older / "src" / "transformers" / "__init__.py").write_text('__version__ = "4.43.4"\n', encoding="utf-8")
        with self.assertRaisesRegex(
            UnrecognisedTreeError, r"transformers 4\.43\.4; the pull-request diff is made for"
        ):
            make_plan(older)

    def test_the_releases_it_is_made_for_are_the_patches_tested_range_and_main(self):
        newest = Version(versions.NEWEST_TESTED_VERSION)
        next_minor = f"{newest.major}.{newest.minor + 1}"
        for release, made_for in (
            (versions.TESTED_VERSIONS[0], True),
            (versions.NEWEST_TESTED_VERSION, True),
            (f"{newest.major}.{newest.minor}.9", True),
            (f"{next_minor}.0.dev0", True),  # a checkout of upstream's main
            (f"{next_minor}.0", False),
            ("4.43.4", False),
        ):
            with self.subTest(release=release):
                self.assertEqual(is_supported_tree(Version(release)), made_for)

    @unittest.skipIf(MADE_FOR_INSTALLED_RELEASE, "the installed release is one the diff is made for (tested below)")
    def test_refuses_the_installed_release(self):
        with self.assertRaisesRegex(UnrecognisedTreeError, f"transformers {TRANSFORMERS_VERSION}"):
            make_plan(self.tree)


@unittest.skipUnless(
    MADE_FOR_INSTALLED_RELEASE, f"the diff is made for {SUPPORTED_RELEASES}, not {TRANSFORMERS_VERSION}"
)
class InstalledReleaseDiffTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.workdir = Path(tempfile.mkdtemp(prefix="pr-diff-"))
        cls.tree = build_pristine_tree(cls.workdir / "pristine")
        cls.plans = make_plan(cls.tree)
        cls.texts = planned_texts(cls.tree, cls.plans)
        cls.diff = unified_diff(cls.texts)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.workdir, ignore_errors=True)

    def test_same_bytes_twice(self):
        self.assertEqual(unified_diff(planned_texts(self.tree)), self.diff)

    def test_touches_what_an_upstream_pull_request_touches(self):
        paths = set(self.texts)
        for path in (
            "src/transformers/modeling_rope_utils.py",
            "src/transformers/rope_cache_utils.py",
            "src/transformers/models/phi3/modular_phi3.py",
            "src/transformers/models/phi3/modeling_phi3.py",
            "src/transformers/models/phimoe/modular_phimoe.py",
            "src/transformers/models/phimoe/modeling_phimoe.py",
            "src/transformers/models/phi4_multimodal/modeling_phi4_multimodal.py",
            "src/transformers/models/llama/modeling_llama.py",
            "tests/models/phi3/test_modeling_phi3.py",
            "tests/models/llama/test_modeling_llama.py",
        ):
            if "/models/" in path and not (self.tree / path).parent.is_dir():
                continue  # a release without that model (Phi-4-multimodal before 4.51)
            if "/modular_" in path and not (self.tree / path).is_file():
                continue  # a release without that modular file
            self.assertIn(path, paths)
        # Upstream's drop of the cache is gone from every model that had it
        for path, (_, after) in self.texts.items():
            if path.startswith("src/"):
                for node in ast.walk(ast.parse(after)):
                    if isinstance(node, ast.FunctionDef) and node.name == "prepare_inputs_for_generation":
                        self.assertFalse(drops_cache_at_switch(ast.get_source_segment(after, node)), path)

    def test_transplanted_code_is_the_code_of_modeling_overrides(self):
        _, rope_utils = self.texts["src/transformers/modeling_rope_utils.py"]
        for function in (modeling_rope_utils.longrope_frequency_update, modeling_rope_utils.dynamic_rope_update):
            self.assertIn(function_source(function), rope_utils)
        _, rope_cache = self.texts["src/transformers/rope_cache_utils.py"]
        for function in (rope_cache_utils.prepare_rope_cache_update, rope_cache_utils.check_rope_cache):
            self.assertIn(function_source(function), rope_cache)
        self.assertNotIn("from transformers.", rope_cache)
        for path, (_, after) in self.texts.items():
            ast.parse(after, filename=path)

    def test_covered_rotary_embeddings_update_through_the_decorator(self):
        # Before 4.51 rotary embeddings update their own frequencies; the diff moves that to `dynamic_rope_update`,
        # as 4.51 did. Phi-3's longrope rotary `forward` becomes that of `modeling_overrides` for its release.
        for model in ("llama", "mistral", "qwen2", "phi3"):
            path = f"src/transformers/models/{model}/modeling_{model}.py"
            if path not in self.texts and covered_model(model)[0] is None:
                continue  # a model this release leaves out (Mistral and Qwen2 of 4.44 take no RoPE type) keeps its code
            before, after = self.texts[path]
            self.assertNotIn("_dynamic_frequency_update", after, model)
            self.assertNotIn("_longrope_frequency_update", after, model)
            if "_dynamic_frequency_update" in before or "@dynamic_rope_update" in before:
                self.assertIn("@dynamic_rope_update", after, model)
        before, after = self.texts["src/transformers/models/phi3/modeling_phi3.py"]
        overrides = {
            "_longrope_frequency_update": ("modeling_phi3_v4_50.py", "Phi3RotaryEmbedding"),
            "class Phi3LongRoPEScaledRotaryEmbedding": ("modeling_phi3_v4_46.py", "Phi3LongRoPEScaledRotaryEmbedding"),
        }
        for marker, (module, class_name) in overrides.items():
            if marker in before:
                override = member_source(OVERRIDES / "models" / "phi3" / module, class_name, "forward")
                self.assertIn(textwrap.indent(override, "    "), after)

    def test_verifies(self):
        report = verify(self.tree, self.workdir, self.texts)
        self.assertEqual(report.apply_error, "")
        self.assertEqual(report.modular_problems, [])
        self.assertEqual(report.new_ruff_findings, [])
        self.assertTrue(report.transformers_imported_from.startswith(str(self.workdir / "patched")))
        self.assertEqual(report.tests_returncode, 0, report.tests_summary)
        self.assertRegex(report.tests_summary, r"^\d+ passed")

    def test_changes_the_models_the_run_time_patches_cover_and_those_completely(self):
        # What the pull request decorates is what `apply()` protects on this release, decoder, causal LM and
        # generation alike: no model partly
        decorated = {
            (edit.class_name, edit.method_name)
            for plan in self.plans
            if "/modeling_" in plan.path
            for edit in plan.edits
            if type(edit).__name__ in ("AddDecorator", "AddMethod", "ReplaceMethod")
        }
        for module_name, model in MODELS.items():
            module, _ = covered_model(module_name)
            classes = [f"{model.prefix}Model", f"{model.prefix}ForCausalLM"]
            with self.subTest(module_name):
                decorated_forwards = {(name, "forward") for name in classes} & decorated
                self.assertEqual(len(decorated_forwards), 2 if module is not None else 0, decorated_forwards)

    def test_description(self):
        description = describe(self.tree, self.workdir / "no-figures", self.plans)
        self.assertTrue(description.split("\n")[2].startswith("## Summary"), description[:300])
        self.assertIn("## Problem", description)
        self.assertIn("`src/transformers/models/phi3/modeling_phi3.py`", description)
        self.assertIn("Phi3LongRopeCacheTest", description)
        self.assertIn("make compare-strategies", description)


@unittest.skipUnless(MADE_FOR_INSTALLED_RELEASE, "the diff is made for the tested releases only")
class MinimalScopeDiffTest(unittest.TestCase):
    """`make diff SCOPE=phi3`: the Phi-3 family's files, the shared RoPE update, the new module and its tests."""

    @classmethod
    def setUpClass(cls):
        cls.workdir = Path(tempfile.mkdtemp(prefix="pr-diff-"))
        cls.tree = build_pristine_tree(cls.workdir / "pristine")
        cls.plans = make_plan(cls.tree, "phi3")
        cls.texts = planned_texts(cls.tree, cls.plans, "phi3")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.workdir, ignore_errors=True)

    def test_touches_only_the_phi3_family(self):
        models = {path.split("/")[-2] for path in self.texts if "/models/" in path}
        self.assertLessEqual(models, set(pull_request_models("phi3")))
        self.assertIn("phi3", models)
        self.assertIn("src/transformers/rope_cache_utils.py", self.texts)
        self.assertIn("src/transformers/modeling_rope_utils.py", self.texts)
        self.assertEqual(
            [path for path in self.texts if path.startswith("tests/")], ["tests/models/phi3/test_modeling_phi3.py"]
        )
        self.assertLess(len(self.texts), len(planned_texts(self.tree)))

    def test_verifies(self):
        report = verify(self.tree, self.workdir, self.texts)
        self.assertEqual(report.apply_error, "")
        self.assertEqual(report.modular_problems, [])
        self.assertEqual(report.new_ruff_findings, [])
        self.assertEqual(report.tests_returncode, 0, report.tests_summary)

    def test_an_unknown_scope_is_refused(self):
        with self.assertRaisesRegex(ValueError, "unknown pull-request scope 'gemma'"):
            make_plan(self.tree, "gemma")


class MergeTestModuleTest(unittest.TestCase):
    def test_merges_into_an_existing_upstream_test_file(self):
        existing = (
            "import unittest\n\nfrom transformers import is_torch_available\n\n\n"
            "class Phi3ModelTest(unittest.TestCase):\n    pass\n"
        )
        module = (
            "import unittest\n\nfrom parameterized import parameterized\n\n\n"
            "class NewTest(unittest.TestCase):\n    pass\n"
        )
        merged = merge_test_module(existing, module)
        self.assertEqual(merged.count("import unittest"), 1)
        self.assertLess(merged.index("from parameterized"), merged.index("class Phi3ModelTest"))
        self.assertTrue(merged.rstrip().endswith("class NewTest(unittest.TestCase):\n    pass"))
        ast.parse(merged)


class ReleaseSpellingTest(unittest.TestCase):
    def test_the_cache_drop_is_recognised_under_either_name_of_the_cache(self):
        drop = (
            "def prepare_inputs_for_generation(self, input_ids, {name}=None, **kwargs):\n"
            "    if {name} and input_ids.shape[1] >= self.config.original_max_position_embeddings + 1:\n"
            "        {name} = None\n"
            "    return super().prepare_inputs_for_generation(input_ids, {name}={name}, **kwargs)\n"
        )
        for name in ("past_key_values", "cache"):
            self.assertTrue(drops_cache_at_switch(drop.format(name=name)), name)
        self.assertFalse(drops_cache_at_switch(drop.format(name="cache").replace("cache = None", "use_cache = None")))

    def test_added_tests_pass_the_cache_under_the_release_s_name(self):
        for release, name in (("5.24.0", "cache"), ("5.23.0", "past_key_values"), ("4.44.2", "past_key_values")):
            for path, text in pr_test_modules(Version(release)).items():
                if path == CONTINUOUS_BATCHING_TESTS:
                    continue  # `generate_batch` takes no cache
                self.assertIn(f", {name}=cache)", text, (release, path))
                self.assertNotIn(", cache=cache)" if name != "cache" else "past_key_values", text, (release, path))

    def test_postponed_annotations_are_unquoted(self):
        # 4.x trees get `from __future__ import annotations`, which makes quoted forward references redundant (UP037)
        text = 'class Record:\n    def of(cls, x: "Record", y="Record") -> "Record":\n        z: "Record" = y\n'
        self.assertEqual(
            _unquoted_annotations(text),
            'class Record:\n    def of(cls, x: Record, y="Record") -> Record:\n        z: Record = y\n',
        )


class SourceEditsTest(unittest.TestCase):
    ROTARY = (
        "import torch\n\n\n"
        "class ToyRotaryEmbedding:\n"
        "    def _dynamic_frequency_update(self, position_ids, device):\n"
        "        pass\n\n"
        "    @torch.no_grad()\n"
        "    def forward(self, x, position_ids):\n"
        '        if "dynamic" in self.rope_type:\n'
        "            self._dynamic_frequency_update(position_ids, device=x.device)\n\n"
        "        # Core RoPE block\n"
        "        return x\n"
    )

    def test_frequency_update_moves_to_the_decorator(self):
        text = MoveFrequencyUpdateToDecorator("ToyRotaryEmbedding", "dynamic_rope_update").apply(self.ROTARY)
        text = RemoveMethod("ToyRotaryEmbedding", "_dynamic_frequency_update").apply(text)
        self.assertEqual(
            text,
            "import torch\n\n\n"
            "class ToyRotaryEmbedding:\n"
            "    @torch.no_grad()\n"
            "    @dynamic_rope_update\n"
            "    def forward(self, x, position_ids):\n"
            "        # Core RoPE block\n"
            "        return x\n",
        )

    def test_a_forward_without_the_update_is_refused(self):
        text = RemoveMethod("ToyRotaryEmbedding", "_dynamic_frequency_update").apply(self.ROTARY)
        once = MoveFrequencyUpdateToDecorator("ToyRotaryEmbedding", "dynamic_rope_update").apply(text)
        with self.assertRaisesRegex(LookupError, "does not start with a frequency update"):
            MoveFrequencyUpdateToDecorator("ToyRotaryEmbedding", "dynamic_rope_update").apply(once)

    def test_an_import_goes_once_its_last_use_is_replaced(self):
        text = "from .a import dropped, used\nfrom .b import unused\nfrom .c import x, unused_too\n\n\nused(x)\n"
        for name in ("used", "dropped", "unused", "unused_too", "not_imported"):
            text = RemoveUnusedImport(name).apply(text)
        self.assertEqual(text, "from .a import used\nfrom .c import x\n\n\nused(x)\n")

    def test_functions_go_after_an_assignment_and_imports_where_isort_puts_them(self):
        text = "import math\nfrom typing import Optional\n\nTABLE = {\n    1: 2,\n}\n\n\ndef last():\n    pass\n"
        text = InsertAfterStatement("TABLE", ("def new():\n    pass\n",)).apply(text)
        text = AddImportFrom(0, "functools", ("wraps",)).apply(text)
        self.assertEqual(
            text,
            "import math\nfrom functools import wraps\nfrom typing import Optional\n\nTABLE = {\n    1: 2,\n}\n\n\n"
            "def new():\n    pass\n\n\ndef last():\n    pass\n",
        )
