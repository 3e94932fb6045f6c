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
"""`scripts/benchmark.py` from the command line, on the tiny model: what it reports, not how fast anything is."""

import json
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from tests.cache_consistency_utils import CONSISTENT_DECODING_AVAILABLE


REPOSITORY = Path(__file__).resolve().parents[1]


class BenchmarkScriptTest(unittest.TestCase):
    def run_script(self, *arguments) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
        command = [sys.executable, str(REPOSITORY / "scripts" / "benchmark.py"), *arguments]
        return subprocess.run(command, capture_output=True, text=True, env=env, check=False, cwd=REPOSITORY)

    def test_reports_every_measurement(self):
        with tempfile.TemporaryDirectory() as output_dir:
            result = self.run_script(
                "--model", "tiny-phi3", "--attention", "eager", "--repeats", "1", "--warmup", "0",
                "--prefix-lengths", "16", "40",
                "--output-dir", output_dir,
            )  # fmt: skip
            self.assertEqual(result.returncode, 0, result.stderr)
            results = json.loads((Path(output_dir) / "bench.json").read_text())

        self.assertIn("| decode step, patched / unpatched |", result.stdout)
        self.assertIn("| prefix length | recompute | plain prefill |", result.stdout)
        for section in ("decode_step", "generate", "batch"):
            self.assertGreater(results[section]["ratio"], 0)
            for timing in results[section]["timings"].values():
                self.assertLessEqual(timing["min_ms"], timing["median_ms"])
                self.assertLessEqual(timing["median_ms"], timing["max_ms"])
        self.assertEqual([row["prefix_length"] for row in results["switch_cost"]], [16, 40])
        self.assertEqual(results["switch_step"]["prefix_length"], 32)
        # Both batch strategies are exact: they must agree to fp32 rounding
        self.assertLess(results["batch"]["max_abs_logit_difference"], 1e-4)
        if CONSISTENT_DECODING_AVAILABLE:
            consistent = results["consistent"]
            for name in ("prefill", "decode step", "generation"):
                self.assertGreater(consistent[name]["ratio"], 0)
            self.assertIn("| consistent / normal: decode step |", result.stdout)
            # What dominates a decode step: the operators either mode spends the most time in, both modes' times
            profile = consistent["decode step profile"]
            self.assertEqual(len(profile["per step ms"]), 8)
            for times in profile["per step ms"].values():
                self.assertEqual(sorted(times), ["consistent", "normal"])
            self.assertGreater(min(profile["total per step ms"].values()), 0)
            self.assertIn("Where a decode step's time goes", result.stdout)
            operations = consistent["operations per decode step"]
            self.assertEqual(operations["context"], 128)  # the tiny model's longest context
            self.assertGreater(operations["consistent"], operations["normal"])
            self.assertEqual(operations["consistent host reads"], 0)
            # The attention of a decode step alone, at each context: a ratio to SDPA and both operation counts
            attention = consistent["decode-step attention"]
            self.assertEqual(sorted(attention), ["1024", "128", "4096"])
            for measured in attention.values():
                self.assertGreater(measured["ratio"], 0)
                self.assertGreater(measured["operations"]["consistent"], measured["operations"]["sdpa"])
            self.assertIn("decode-step attention alone, 4096 keys", result.stdout)
            self.assertIn("Operations of one decode step at a 128-token context", result.stdout)
        else:
            self.assertIn("needs transformers>=4.48", results["consistent"]["skipped"])

    def test_cuda_without_a_gpu_is_a_clear_error(self):
        import torch

        if torch.cuda.is_available():
            self.skipTest("a CUDA device is present")
        result = self.run_script("--device", "cuda")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("torch sees no CUDA device", result.stderr)
