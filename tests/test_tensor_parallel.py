"""
Tensor parallelism: a tiny longrope Phi-3 loaded with `from_pretrained(tp_plan="auto")` on two CPU processes
(`torchrun`, gloo), decoded across the switch in a hand-written loop (`tests/tensor_parallel_worker.py`).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import torch
from packaging.version import Version

from tests.cache_consistency_utils import FP32_TOLERANCE, TRANSFORMERS_VERSION, tiny_phi3_config
from tests.tensor_parallel_worker import RESULT_MARKER
from transformers import Phi3ForCausalLM


REPOSITORY = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_tensor_parallelism_skip_reason() -> str | None:
    if Version("5.0") > TRANSFORMERS_VERSION:
        return (
            "CPU tensor parallelism (`tp_plan=auto` over gloo) is tested from transformers 5.0; "
            f"{TRANSFORMERS_VERSION} is installed (older releases are not verified on CPU here)"
        )
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "this torch build has no torch.distributed gloo backend"
    return None


SKIP_REASON = cpu_tensor_parallelism_skip_reason()


@unittest.skipIf(SKIP_REASON is not None, SKIP_REASON)
class TensorParallelTest(unittest.TestCase):
    def run_workers(self, model_directory: Path) -> dict:
        """Runs the two ranks and returns rank 0's measurements; their output is shown if they fail."""
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            str(REPOSITORY / "tests" / "tensor_parallel_worker.py"), str(model_directory),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"}
        # A session of its own, so that a timeout ends torchrun and both ranks, and nothing else
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPOSITORY,
            start_new_session=True,
        )  # fmt: skip
        try:
            output, _ = process.communicate(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            self.fail(f"the workers ran past {WORKER_TIMEOUT_S} s; their output:\n{output}")
        self.assertEqual(process.returncode, 0, f"the workers failed; their output:\n{output}")
        results = [line[len(RESULT_MARKER) :] for line in output.splitlines() if line.startswith(RESULT_MARKER)]
        self.assertEqual(len(results), 1, f"rank 0 reported no result; the workers' output:\n{output}")
        return json.loads(results[0])

    def test_hand_written_loop_matches_no_cache(self):
        with tempfile.TemporaryDirectory() as directory:
            torch.manual_seed(0)
            # Every sharded size even: vocabulary, hidden size, heads, key-value heads, MLP
            config = tiny_phi3_config(
                vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
            )
            Phi3ForCausalLM(config).save_pretrained(directory)
            result = self.run_workers(Path(directory))

        self.assertEqual(result["world_size"], 2)
        local_rows, rows = result["qkv_proj_rows"]
        self.assertEqual(local_rows * 2, rows, "the attention projection must be sharded across the two ranks")
        # The sharded model computes the model: its forward pass without cache is the single process's
        self.assertLessEqual(result["single_process_difference"], FP32_TOLERANCE)
        self.assertEqual(len(result["patched"]), len(result["upstream"]))
        self.assertGreater(max(result["upstream"]), 0.1, "upstream's loop must be stale, or this test could not fail")
        self.assertLessEqual(max(result["patched"]), FP32_TOLERANCE, f"max |Δlogit| per step: {result['patched']}")


if __name__ == "__main__":
    unittest.main()
