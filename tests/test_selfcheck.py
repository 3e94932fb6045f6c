"""Testing the self-check, `python -m patches check`: it passes here, and it fails when a path is not protected."""

import dataclasses
import os
import subprocess
import sys
import unittest
from pathlib import Path
from unittest import mock

import patches
from patches import selfcheck


REPO_ROOT = Path(__file__).resolve().parent.parent


class SelfCheckTest(unittest.TestCase):
    def setUp(self):
        patches.revert()
        self.addCleanup(patches.revert)

    def test_a_protected_family_passes_and_the_patches_are_left_as_they_were(self):
        # Every family is checked by the command-line test below; here the API, on one
        phi3 = [family for family in selfcheck.checked_families() if family.name == "Phi-3 longrope"]
        patches.apply(stale_cache="warn")
        with mock.patch.object(selfcheck, "checked_families", return_value=phi3):
            report = patches.check(verbose=False)
        self.assertTrue(report.passed, str(report))
        self.assertIn("loop, DynamicCache", {result.path for result in report.results if result.status == "ok"})
        self.assertEqual(patches.status().stale_cache, {"longrope": "warn", "dynamic": "warn"})

    def test_a_path_left_unprotected_fails_the_check(self):
        # "ignore" keeps upstream's handling of the cache: Phi-3's hand-written loops are stale on every release
        unprotected = [
            dataclasses.replace(family, stale_cache="ignore")
            for family in selfcheck.checked_families()
            if family.name == "Phi-3 longrope"
        ]
        with mock.patch.object(selfcheck, "checked_families", return_value=unprotected):
            report = patches.check(verbose=False)
        self.assertFalse(report.passed)
        failed = {result.path for result in report.results if result.status == "FAILED"}
        self.assertIn("loop, DynamicCache", failed)
        self.assertIn("FAILED (", str(report))

    def test_an_untested_release_fails_the_check_with_the_reason(self):
        with mock.patch.object(patches.versions, "installed_version", return_value=patches.versions.Version("99.0")):
            report = patches.check(verbose=False)
        self.assertFalse(report.passed)
        self.assertIn("99.0 is installed", report.results[0].detail)

    def test_the_command_line_prints_the_table_and_exits_with_the_verdict(self):
        completed = subprocess.run(
            [sys.executable, "-m", "patches", "check"],
            cwd=REPO_ROOT,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.assertEqual(completed.returncode, 0, completed.stdout[-3000:] + completed.stderr[-3000:])
        for family in selfcheck.checked_families():
            self.assertIn(f"| {family.name}", completed.stdout)
        self.assertNotIn("| FAILED", completed.stdout)
        self.assertIn("[  1] Phi-3 longrope · loop, DynamicCache: ok", completed.stdout)
        self.assertTrue(completed.stdout.rstrip().endswith("PASSED"), completed.stdout[-500:])
