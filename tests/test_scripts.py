"""Every script runs as its docstring shows, from the repository root, without `make` (which sets `PYTHONPATH`)."""

import os
import subprocess
import sys
import unittest
from pathlib import Path

from parameterized import parameterized


REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(path.name for path in (REPO_ROOT / "scripts").glob("*.py"))


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
