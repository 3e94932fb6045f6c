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
The one table of what is covered (`patches/coverage.py`): the eras and their releases, the range pip and the version
gate read, the recognition of an era that the run-time patches and the pull request share, and the models.
"""

import inspect
import unittest

from packaging.requirements import Requirement

import patches
from patches import coverage, versions
from patches.targets import covered_model, installed_era
from transformers.models.phi3 import modeling_phi3

from .cache_consistency_utils import TRANSFORMERS_VERSION


class ErasTest(unittest.TestCase):
    def test_pip_reads_the_range_of_the_table(self):
        lines = versions.REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines()
        requirements = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
        transformers_line = next(requirement for requirement in requirements if requirement.name == "transformers")
        self.assertEqual(transformers_line, Requirement(coverage.supported_requirement()))
        self.assertEqual(versions.supported_range(), ">=4.44.2,<5.25")

    def test_every_tested_release_lies_in_its_era(self):
        for era in coverage.ERAS:
            for release in era.tested_releases:
                self.assertIs(coverage.era_of_release(release), era, release)
        self.assertEqual(coverage.TESTED_VERSIONS[-1], coverage.NEWEST_TESTED_VERSION)
        self.assertIsNone(coverage.era_of_release("4.43.4"))
        self.assertIs(coverage.era_of_release("5.25.0.dev0"), coverage.ERAS[-1])

    def test_the_self_checked_releases_are_one_per_minor_of_the_range(self):
        # CI runs `python -m patches check` on each: every minor the range admits, its latest patch release
        from packaging.version import Version

        minors = [Version(release).release[:2] for release in coverage.SELF_CHECKED_RELEASES]
        self.assertEqual(len(set(minors)), len(minors))
        self.assertEqual(minors, sorted(minors))
        for release in coverage.SELF_CHECKED_RELEASES:
            self.assertTrue(versions.is_supported(Version(release)), release)
            self.assertIsNotNone(coverage.era_of_release(release), release)
        self.assertLessEqual(set(coverage.TESTED_VERSIONS), set(coverage.SELF_CHECKED_RELEASES))
        oldest, newest = Version(coverage.TESTED_VERSIONS[0]), Version(coverage.NEWEST_TESTED_VERSION)
        majors_minors = {4: range(oldest.minor, 58), 5: range(0, newest.minor + 1)}
        expected = [(major, minor) for major, span in majors_minors.items() for minor in span]
        self.assertEqual(minors, expected)

    @unittest.skipUnless(versions.is_supported(TRANSFORMERS_VERSION), "the era of a supported release only")
    def test_the_installed_release_is_recognised_as_its_era(self):
        era = installed_era()
        self.assertIs(era, coverage.era_of_release(str(TRANSFORMERS_VERSION)))
        self.assertTrue(era.matches(inspect.getsource(modeling_phi3)))

    def test_a_source_of_another_era_is_refused(self):
        source = inspect.getsource(modeling_phi3)
        other_release = "4.46.3" if installed_era() is not coverage.ERAS[0] else "5.24.0"
        with self.assertRaisesRegex(coverage.UnrecognisedEraError, "has the shape of the .* era, but the release"):
            coverage.recognise_era(source, other_release)
        with self.assertRaisesRegex(coverage.UnrecognisedEraError, "the shape of no known era"):
            coverage.recognise_era("class Phi3RotaryEmbedding:\n    pass\n", str(TRANSFORMERS_VERSION))


class ModelsTest(unittest.TestCase):
    def test_every_model_row_names_a_known_rotary_and_frequencies(self):
        for module_name, model in coverage.MODELS.items():
            with self.subTest(module_name):
                self.assertIn(model.rotary, (coverage.STANDARD_ROTARY, coverage.PHI3_ROTARY, coverage.PHIMOE_ROTARY))
                self.assertIn(model.frequencies, (coverage.PER_ROW, coverage.BATCH_WIDE_WITHOUT_POSITIONS))
                self.assertLessEqual(set(model.self_check), {"longrope", "dynamic"})
        self.assertFalse(set(coverage.MODELS) & set(coverage.LEFT_OUT_MODELS))

    def test_minicpm3_is_covered_where_the_release_has_it(self):
        module, reason = covered_model("minicpm3")
        if reason is not None:
            self.assertIn("does not have", reason)
        else:
            self.assertIn("MiniCPM3Model.forward", patches.apply().patched)
            patches.revert()

    def test_rotation_per_row_is_read_from_the_rotary_forward(self):
        self.assertTrue(coverage.rotates_per_row(["self", "x", "position_ids"]))
        self.assertFalse(coverage.rotates_per_row(["self", "x", "seq_len"]))
