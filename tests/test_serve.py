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
End to end: the real `transformers serve --continuous-batching` (started by `python -m patches serve` on a local port,
with a tiny longrope Phi-3 and a tiny word-level tokenizer built offline in a temporary folder) answers concurrent
OpenAI-style completion requests, some of which cross the RoPE switch, each as greedy decoding of that request alone
without cache. The server is stopped at the end. No network.
"""

import concurrent.futures
import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request
from pathlib import Path

import patches
from patches.coverage import CONTINUOUS_BATCHING_FROM, protects_continuous_batching
from patches.reference import greedy_alone
from patches.tiny_models import SWITCH_POINT, random_tokens, tiny_phi3_model
from transformers.utils import import_utils

from .cache_consistency_utils import TRANSFORMERS_VERSION


ROOT = Path(__file__).resolve().parents[1]
SUPPORTED = protects_continuous_batching(str(TRANSFORMERS_VERSION))
NEW_TOKENS = 8
PROMPT_LENGTHS = (SWITCH_POINT - 4, 5, SWITCH_POINT + 8, SWITCH_POINT - 2, 10)
"""Two requests that cross the switch while decoding, two that stay short, one past it from the start."""
STARTUP_TIMEOUT = 180


def word_tokenizer():
    """A word-level tokenizer of the tiny model's 97 ids: `w3` ... `w96` are ids 3 to 96, split on spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{index}": index for index in range(3, 97)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@unittest.skipUnless(
    SUPPORTED, f"the patches protect continuous batching from transformers {CONTINUOUS_BATCHING_FROM}"
)
@unittest.skipUnless(
    getattr(import_utils, "is_serve_available", lambda: False)(),
    "`transformers serve` needs transformers' serving extra (requirements-dev.txt)",
)
class ServeContinuousBatchingTest(unittest.TestCase):
    SERVE = [sys.executable, "-m", "patches", "serve"]
    """How the server is started: through the patches' command line, which applies them in the server's process."""

    @classmethod
    def setUpClass(cls):
        cls.model_dir = Path(tempfile.mkdtemp(prefix="tiny-phi3-"))
        cls.model = tiny_phi3_model(attn_implementation="sdpa")
        cls.model.save_pretrained(cls.model_dir)
        cls.tokenizer = word_tokenizer()
        cls.tokenizer.save_pretrained(cls.model_dir)
        cls.port = free_port()
        cls.log = tempfile.TemporaryFile()
        command = [*cls.SERVE, str(cls.model_dir), "--continuous-batching"]
        command += ["--device", "cpu", "--attn-implementation", "sdpa", "--port", str(cls.port), "--host", "127.0.0.1"]
        command += ["--cb-block-size", "16", "--cb-num-blocks", "64", "--cb-max-batch-tokens", "64"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        cls.server = subprocess.Popen(command, env=env, stdout=cls.log, stderr=subprocess.STDOUT)
        cls.addClassCleanup(cls.stop_server)
        cls.wait_until_healthy()

    @classmethod
    def stop_server(cls):
        cls.server.terminate()
        try:
            cls.server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            cls.server.kill()
            cls.server.wait()
        cls.log.close()

    @classmethod
    def server_log(cls) -> str:
        cls.log.seek(0)
        return cls.log.read().decode(errors="replace")[-3000:]

    @classmethod
    def wait_until_healthy(cls):
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if cls.server.poll() is not None:
                raise RuntimeError(f"the server exited with {cls.server.returncode}:\n{cls.server_log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{cls.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"the server did not answer in {STARTUP_TIMEOUT} s:\n{cls.server_log()}")

    def complete(self, prompt: str) -> str:
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", timeout=120)
        completion = client.completions.create(
            model=str(self.model_dir), prompt=prompt, max_tokens=NEW_TOKENS, temperature=0
        )
        return completion.choices[0].text

    def answers_and_references(self) -> list[tuple[list[str], list[str]]]:
        """The server's answers to concurrent requests, each with greedy decoding of that request alone."""
        prompts = [random_tokens(length, seed=index)[0].tolist() for index, length in enumerate(PROMPT_LENGTHS)]
        texts = [" ".join(f"w{token}" for token in prompt) for prompt in prompts]
        with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
            answers = list(pool.map(self.complete, texts))
        pairs = []
        for prompt, text, answer in zip(prompts, texts, answers):
            self.assertEqual(self.tokenizer(text)["input_ids"], prompt)
            expected = self.tokenizer.decode(greedy_alone(self.model, prompt, NEW_TOKENS)[0], skip_special_tokens=True)
            pairs.append((answer.split(), expected.split()))
        return pairs

    def test_concurrent_requests_answer_as_each_alone(self):
        for index, (answer, expected) in enumerate(self.answers_and_references()):
            self.assertEqual(answer, expected, f"request {index}\n{self.server_log()}")
        self.assertFalse(patches.status().applied)  # the server patched its own process, not this one


class ServeUpstreamTest(ServeContinuousBatchingTest):
    """The same server without the patches: some answers differ, so that the test above can fail."""

    SERVE = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve"]

    def test_concurrent_requests_answer_as_each_alone(self):
        pairs = self.answers_and_references()
        self.assertTrue(any(answer != expected for answer, expected in pairs), pairs)
