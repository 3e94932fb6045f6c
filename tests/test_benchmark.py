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
"""`scripts/benchmark.py` and `scripts/profile_decoding.py` from the command line, on the tiny model: what they report,
not how fast anything is; and how the profile counts operations."""

import json
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import torch

from scripts.profile_decoding import count_operations
from tests.cache_consistency_utils import CONSISTENT_DECODING_AVAILABLE


REPOSITORY = Path(__file__).resolve().parents[1]


def run_script(name: str, *arguments) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    command = [sys.executable, str(REPOSITORY / "scripts" / name), *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, check=False, cwd=REPOSITORY)


class BenchmarkScriptTest(unittest.TestCase):
    def run_script(self, *arguments) -> subprocess.CompletedProcess:
        return run_script("benchmark.py", *arguments)

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
        if torch.cuda.is_available():
            self.skipTest("a CUDA device is present")
        result = self.run_script("--device", "cuda")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("torch sees no CUDA device", result.stderr)


class ProfileScriptTest(unittest.TestCase):
    def test_reports_the_profile_and_the_operations(self):
        with tempfile.TemporaryDirectory() as output_dir:
            # Eager: 4.44's Phi-3 has no SDPA
            arguments = ("--model", "tiny-phi3", "--attention", "eager", "--output-dir", output_dir)
            result = run_script("profile_decoding.py", *arguments)
            self.assertEqual(result.returncode, 0, result.stderr)
            results = json.loads((Path(output_dir) / "profile.json").read_text())

        self.assertEqual(results["model"], "tiny-phi3")
        if not CONSISTENT_DECODING_AVAILABLE:
            self.assertIn("needs transformers>=4.48", results["skipped"])
            return
        profile = results["decode step profile"]
        self.assertEqual(profile["steps"], 16)
        self.assertEqual(len(profile["per step ms"]), 8)
        for times in profile["per step ms"].values():
            self.assertEqual(sorted(times), ["consistent", "normal"])
        self.assertGreater(min(profile["total per step ms"].values()), 0)
        # The model is built long enough for the 4k context, whatever its switch point
        operations = results["operations per decode step"]
        self.assertEqual(operations["context"], 4096)
        self.assertGreater(operations["consistent"], operations["normal"])
        self.assertEqual(operations["consistent host reads"], 0)
        attention = results["decode-step attention operations"]
        self.assertEqual(sorted(attention), ["1024", "128", "4096"])
        for counted in attention.values():
            self.assertEqual(counted["sdpa"], 1)
            self.assertGreater(counted["consistent"], counted["sdpa"])
        self.assertIn("Where a decode step's time goes", result.stdout)
        self.assertIn("Operations of one decode step at a 4096-token context", result.stdout)


class CountOperationsTest(unittest.TestCase):
    """What `count_operations` counts, from a `torch.profiler` trace: the operations called, views aside."""

    def test_views_are_not_counted(self):
        matrix = torch.randn(4, 4)
        self.assertEqual(count_operations(lambda: matrix.t()[1:].unsqueeze(0)), (0, 0))

    def test_an_operation_counts_once_whatever_it_runs(self):
        rows, weight = torch.randn(2, 3, 4), torch.randn(5, 4)
        # `linear` of a batch runs a transpose, reshapes and a product beneath it
        self.assertEqual(count_operations(lambda: torch.nn.functional.linear(rows, weight)), (1, 0))
        self.assertEqual(count_operations(lambda: (rows * 2).sum(-1)), (2, 0))

    def test_an_operation_that_may_return_a_view_counts_its_copy(self):
        matrix = torch.randn(4, 4)
        self.assertEqual(count_operations(lambda: matrix.to(torch.float32)), (0, 0))
        self.assertEqual(count_operations(lambda: matrix.to(torch.float64)), (1, 0))
        self.assertEqual(count_operations(lambda: matrix.t().reshape(16)), (1, 0))
        self.assertEqual(count_operations(lambda: matrix.reshape(16)), (0, 0))

    def test_reads_back_to_the_host_are_counted(self):
        matrix = torch.randn(4, 4)
        self.assertEqual(count_operations(lambda: matrix.sum().item()).host_reads, 1)
        self.assertEqual(count_operations(lambda: bool(matrix.sum() > 0)).host_reads, 1)
        self.assertEqual(count_operations(lambda: matrix[matrix > 0]).host_reads, 1)
        self.assertEqual(count_operations(lambda: matrix.sum() > 0).host_reads, 0)
