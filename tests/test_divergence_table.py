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
"""`scripts/divergence_table.py` from the command line, on a tiny dummy model."""

import csv
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path


REPOSITORY = Path(__file__).resolve().parents[1]


class DivergenceTableTest(unittest.TestCase):
    def run_script(self, *arguments) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
        command = [sys.executable, str(REPOSITORY / "scripts" / "divergence_table.py"), *arguments]
        return subprocess.run(command, capture_output=True, text=True, env=env, check=False, cwd=REPOSITORY)

    def test_table_and_csv(self):
        with tempfile.TemporaryDirectory() as output_dir:
            result = self.run_script(
                "--model", "tiny-llama", "--dtypes", "fp32", "bf16", "--attention", "eager", "sdpa",
                "--samples", "2", "--prompt-length", "10", "--output-dir", output_dir,
            )  # fmt: skip
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn("| output | fp32 eager | fp32 sdpa | bf16 eager | bf16 sdpa |", result.stdout)
            rows = list(csv.DictReader((Path(output_dir) / "divergence.csv").open(encoding="utf-8")))
        # Embeddings, two layers, logits: for each of four settings
        self.assertEqual(len(rows), 4 * 4)
        self.assertEqual(
            [row["output"] for row in rows[:4]], ["hidden state 0", "hidden state 1", "hidden state 2", "logits"]
        )
        for row in rows:
            self.assertEqual(row["samples"], "2")
            if row["output"] == "hidden state 0":
                # The embeddings of the new token are looked up, not computed: no rounding at all
                self.assertEqual(float(row["mean_max_abs_diff"]), 0.0)
            if row["dtype"] == "fp32":
                self.assertLess(float(row["mean_max_abs_diff"]), 1e-4)

    def test_unknown_model_is_a_clear_error(self):
        result = self.run_script("--model", "no-such-model-here", "--dtypes", "fp32", "--samples", "1")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("neither a dummy model", result.stderr)
