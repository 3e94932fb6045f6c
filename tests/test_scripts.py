"""Every script runs as its docstring shows, from the repository root, without `make` (which sets `PYTHONPATH`); the
demo (`make demo`, the README's table) shows every path exact patched."""

import os
import subprocess
import sys
import unittest
from pathlib import Path

from packaging.version import Version
from parameterized import parameterized

import transformers
from patches.coverage import NEWEST_TESTED_VERSION
from patches.reference import FP32_TOLERANCE


REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(
    path.name
    for path in (REPO_ROOT / "scripts").glob("*.py")
    if 'if __name__ == "__main__":' in path.read_text(encoding="utf-8")
)
"""The scripts (`scripts/bench_models.py`, which two of them import, is not one)."""


@unittest.skipUnless(
    Version(transformers.__version__).base_version == NEWEST_TESTED_VERSION,
    "how a script finds the packages without `make` does not depend on the transformers release (and each start costs "
    "the imports of torch and transformers); the scripts' own tests run on every release",
)
class ScriptsRunWithoutMakeTest(unittest.TestCase):
    @parameterized.expand([(name.removesuffix(".py"), name) for name in SCRIPTS])
    def test_help(self, _, name):
        environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        completed = subprocess.run(
            [sys.executable, f"scripts/{name}", "--help"],
            cwd=REPO_ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(completed.returncode, 0, completed.stderr[-2000:])
        self.assertIn("usage:", completed.stdout)


@unittest.skipUnless(
    Version(transformers.__version__).base_version == NEWEST_TESTED_VERSION,
    f"the demo's table is the README's, of transformers {NEWEST_TESTED_VERSION}",
)
class DemoTest(unittest.TestCase):
    def test_every_path_is_exact_patched_and_the_loops_are_stale_unpatched(self):
        completed = subprocess.run(
            [sys.executable, "scripts/reproduce.py"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
        )
        self.assertEqual(completed.returncode, 0, completed.stderr[-2000:])
        rows = {}
        table = [line for line in completed.stdout.splitlines() if line.startswith("| ")]
        for line in table[1:]:  # under the header row
            path, unpatched, patched = (cell.strip() for cell in line.strip("|").split("|"))
            rows[path] = (unpatched, patched)
        self.assertIn("loop, DynamicCache", rows)
        self.assertIn("generate() assisted decoding", rows)
        for path, (unpatched, patched) in rows.items():
            self.assertLessEqual(float(patched), FP32_TOLERANCE, path)
        self.assertGreater(float(rows["loop, DynamicCache"][0]), 1.0)
