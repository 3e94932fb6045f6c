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
`patches.apply(consistent=True)` at realistic widths: hidden size 512 and an intermediate size of 1376 (no multiple of
64) reach torch's parallel thresholds and the BLAS's blocking, which the tiny models of the model tests never do. Also
the machine check, attention weights and dropout.
"""

import contextlib
import os
import unittest
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import patches
from patches import consistent_decoding
from patches.coverage import NEWEST_TESTED_VERSION
from patches.tiny_models import tiny_llama_model, tiny_phi3_model
from transformers.testing_utils import require_torch_accelerator, slow, torch_device

from .cache_consistency_utils import (
    TRANSFORMERS_VERSION,
    bitwise_mismatches,
    greedy_with_and_without_cache,
    left_padding_mask,
    new_cache,
    random_tokens,
)


CONSISTENT_DECODING_AVAILABLE = TRANSFORMERS_VERSION.release >= (4, 48)
ON_NEWEST_TESTED_RELEASE = TRANSFORMERS_VERSION.base_version == NEWEST_TESTED_VERSION
"""What realistic widths check is torch's kernels (MKL, oneDNN, SiLU's vectorisation), and every environment of the
matrix shares one torch: they run on the newest tested release only, while the tiny models' consistent tests, which
check how each release's attention and layers are bound, run on every release."""

REALISTIC_SIZES = {
    "vocab_size": 1000,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "initializer_range": 0.02,
}
"""Head dimension 64, grouped queries; 1376 = 64 x 21.5."""

SWITCH_POINT = 48
"""The realistic models' longrope switch: prompts of 40 tokens cross it while decoding."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

CPU_CORES = os.cpu_count() or 1

THREAD_COUNTS = sorted({1, 2, 3, CPU_CORES})
"""One thread, two, an odd split (3, even on fewer cores) and every core."""


def realistic_model(family: str, dtype: torch.dtype, attention: str):
    if family == "phi3":
        model = tiny_phi3_model(switch_point=SWITCH_POINT, attn_implementation=attention, **REALISTIC_SIZES)
    else:
        model = tiny_llama_model(
            switch_point=SWITCH_POINT, rotary_dim=64, attn_implementation=attention, **REALISTIC_SIZES
        )
    return model.to(dtype)


@contextlib.contextmanager
def torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@unittest.skipUnless(
    ON_NEWEST_TESTED_RELEASE, f"realistic widths check torch's kernels: run on {NEWEST_TESTED_VERSION}"
)
class RealisticWidthConsistentDecodingTest(unittest.TestCase):
    """Every decode step's logits `torch.equal` to the forward pass without cache, at realistic widths."""

    def test_left_padded_decode_steps_across_the_switch(self):
        # 14 decode steps, from 42 tokens to 56: both rows cross the switch (48; the padded row at 51)
        input_ids = random_tokens(56, batch_size=2, vocab_size=1000)
        attention_mask = left_padding_mask(2, 56)
        for family in ("llama", "phi3"):
            for dtype_name, dtype in DTYPES.items():
                for attention in ("eager", "sdpa"):
                    model = realistic_model(family, dtype, attention)
                    for threads in THREAD_COUNTS:
                        with self.subTest(family=family, dtype=dtype_name, attention=attention, threads=threads):
                            with torch_threads(threads):
                                mismatches = self._mismatches_or_refusal(model, input_ids, attention_mask, threads)
                            self.assertEqual(mismatches, [])

    def _mismatches_or_refusal(self, model, input_ids, attention_mask, threads):
        """
        The decode steps' mismatches, or none where `apply(consistent=True)` refuses with more threads than cores: the
        BLAS may then split one product differently from call to call (CI's 2-core machine refused fp32 products of
        1376x512 with 3 threads, where this one passes), and refusing, naming the thread count, is what it must do.
        With as many threads as cores or fewer the check must pass.
        """
        try:
            with patches.applied(consistent=True):
                return bitwise_mismatches(model, input_ids, 42, attention_mask=attention_mask)
        except patches.ConsistentDecodingUnavailableError as refusal:
            if threads <= CPU_CORES:
                raise
            self.assertIn(f"with {threads} threads", str(refusal))
            self.assertFalse(patches.status().applied)
            return []


@unittest.skipUnless(
    ON_NEWEST_TESTED_RELEASE, f"realistic widths check torch's kernels: run on {NEWEST_TESTED_VERSION}"
)
class RealisticWidthConsistentGenerationTest(unittest.TestCase):
    """`generate()`'s sequences and every step's logits `torch.equal` to those without cache at realistic widths, and
    the rounding noise that normal mode leaves there (a class of its own, which `make test`'s workers run beside the
    decode steps)."""

    def test_greedy_generations_across_the_switch(self):
        input_ids = random_tokens(30, batch_size=2, vocab_size=1000)
        attention_mask = left_padding_mask(2, 30)
        for family in ("llama", "phi3"):
            for dtype_name, dtype in DTYPES.items():
                model = realistic_model(family, dtype, "sdpa")
                with self.subTest(family=family, dtype=dtype_name), patches.applied(consistent=True):
                    cached, uncached = greedy_with_and_without_cache(model, input_ids, 40, attention_mask)
                    self.assertTrue(torch.equal(cached.sequences, uncached.sequences))
                    for step, (with_cache, without_cache) in enumerate(zip(cached.logits, uncached.logits)):
                        self.assertTrue(torch.equal(with_cache, without_cache), f"step {step}")

    def test_normal_mode_differs_at_this_width(self):
        # What consistent mode removes: fp32 rounding noise between a decode step and the forward pass
        model = realistic_model("llama", torch.float32, "sdpa")
        with patches.applied():
            mismatches = bitwise_mismatches(model, random_tokens(50, vocab_size=1000), 40)
        self.assertGreater(len(mismatches), 0)


@slow
@require_torch_accelerator
@unittest.skipUnless(CONSISTENT_DECODING_AVAILABLE, "consistent decoding needs transformers 4.48 or later")
class AcceleratorConsistentDecodingTest(unittest.TestCase):
    """
    The realistic-width checks on the accelerator (`make test-slow` on a GPU). `apply(consistent=True)` first checks
    the accelerator's kernels too, and refuses, naming each one, where they are not row-invariant.
    """

    def test_left_padded_decode_steps_across_the_switch(self):
        input_ids = random_tokens(64, batch_size=2, vocab_size=1000).to(torch_device)
        attention_mask = left_padding_mask(2, 64).to(torch_device)
        with patches.applied(consistent=True):
            for family in ("llama", "phi3"):
                for dtype_name, dtype in DTYPES.items():
                    for attention in ("eager", "sdpa"):
                        model = realistic_model(family, dtype, attention).to(torch_device)
                        with self.subTest(family=family, dtype=dtype_name, attention=attention):
                            mismatches = bitwise_mismatches(model, input_ids, 40, attention_mask=attention_mask)
                            self.assertEqual(mismatches, [])

    def test_greedy_generations_across_the_switch(self):
        input_ids = random_tokens(30, batch_size=2, vocab_size=1000).to(torch_device)
        attention_mask = left_padding_mask(2, 30).to(torch_device)
        with patches.applied(consistent=True):
            for family in ("llama", "phi3"):
                for dtype_name, dtype in DTYPES.items():
                    model = realistic_model(family, dtype, "sdpa").to(torch_device)
                    with self.subTest(family=family, dtype=dtype_name):
                        cached, uncached = greedy_with_and_without_cache(model, input_ids, 40, attention_mask)
                        self.assertTrue(torch.equal(cached.sequences, uncached.sequences))
                        for with_cache, without_cache in zip(cached.logits, uncached.logits):
                            self.assertTrue(torch.equal(with_cache, without_cache))


@unittest.skipUnless(CONSISTENT_DECODING_AVAILABLE, "consistent decoding needs transformers 4.48 or later")
class ConsistentAttentionOutputsTest(unittest.TestCase):
    """Upstream's behaviour kept: attention weights from eager attention, dropout while training."""

    def test_eager_returns_the_attention_weights(self):
        model = tiny_llama_model(attn_implementation="eager")
        input_ids = random_tokens(70)
        with patches.applied():
            expected = model(input_ids, output_attentions=True).attentions
        with patches.applied(consistent=True):
            found = model(input_ids, output_attentions=True).attentions
        self.assertEqual(len(found), len(expected))
        for layer_weights, expected_weights in zip(found, expected):
            self.assertEqual(layer_weights.shape, expected_weights.shape)
            torch.testing.assert_close(layer_weights, expected_weights, rtol=1e-5, atol=1e-6)

    def test_generation_paths_that_read_attention_weights_run(self):
        model = tiny_llama_model(attn_implementation="eager")
        input_ids = torch.cat([random_tokens(20), random_tokens(20)], dim=1)  # repeats, for prompt lookup
        with patches.applied(consistent=True):
            greedy = model.generate(input_ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
            lookup = model.generate(
                input_ids,
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=0,
                prompt_lookup_num_tokens=3,
                output_attentions=True,
                return_dict_in_generate=True,
            )
        self.assertTrue(torch.equal(lookup.sequences, greedy))
        self.assertEqual(len(lookup.attentions), 12)

    def test_dropout_applies_while_training_only(self):
        model = tiny_llama_model(attn_implementation="eager", attention_dropout=0.5)
        input_ids = random_tokens(40)
        with patches.applied(consistent=True):
            model.train()
            first, second = model(input_ids).logits, model(input_ids).logits
            model.eval()
            third, fourth = model(input_ids).logits, model(input_ids).logits
        self.assertFalse(torch.equal(first, second))
        self.assertTrue(torch.equal(third, fourth))


class ConsistentAttentionTest(unittest.TestCase):
    """The attention function itself: attention's value, whatever the number of passes over the queries."""

    def setUp(self):
        generator = torch.Generator().manual_seed(0)
        # 8 heads over 4 key-value heads, 150 queries: 38 tiles, 3 key blocks (the last one partial)
        self.query = torch.randn((2, 8, 150, 32), generator=generator)
        self.key, self.value = torch.randn((2, 2, 4, 150, 32), generator=generator)
        padding = torch.arange(150)[None] >= torch.tensor([[0], [7]])  # the second row left-padded by 7
        causal = torch.ones(150, 150, dtype=torch.bool).tril()
        self.mask = (causal[None] & padding[:, None])[:, None]
        self.mask[1, 0, :7, 0] = True  # as the masking utilities leave padding queries: seeing a key

    def attention(self, mask):
        return consistent_decoding.consistent_eager_attention_forward(
            torch.nn.Module().eval(), self.query, self.key, self.value, mask
        )

    def test_equals_scaled_dot_product_attention(self):
        output, weights = self.attention(self.mask)
        expected = F.scaled_dot_product_attention(
            self.query, self.key.repeat_interleave(2, 1), self.value.repeat_interleave(2, 1), attn_mask=self.mask
        )
        torch.testing.assert_close(output, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 8, 150))

    def test_fp16_values_near_their_limit_do_not_overflow(self):
        # A key block's partial output is a weighted mean of its values, as in eager attention: never 64 values summed
        query = torch.zeros((1, 1, 64, 32), dtype=torch.float16)  # uniform attention
        value = torch.full((1, 1, 64, 32), 1100.0, dtype=torch.float16)
        output, _ = consistent_decoding.consistent_sdpa_attention_forward(
            torch.nn.Module().eval(), query, query.clone(), value, torch.ones((1, 1, 64, 64), dtype=torch.bool)
        )
        self.assertTrue(torch.equal(output, torch.full_like(output, 1100.0)))

    def test_a_prefill_in_several_passes_equals_one_pass(self):
        # A full mask, one row broadcast over the queries, and none (causal)
        for mask in (self.mask, self.mask[:, :, -1:], None):
            with self.subTest(mask=None if mask is None else tuple(mask.shape)):
                output, weights = self.attention(mask)
                with mock.patch.object(consistent_decoding, "MAX_PASS_BYTES", 1):  # one query tile a pass
                    output_in_passes, weights_in_passes = self.attention(mask)
                self.assertTrue(torch.equal(output_in_passes, output))
                self.assertTrue(torch.equal(weights_in_passes, weights))


class _HostReadCounter(TorchDispatchMode):
    """Counts the tensors read back to the host (`.item()`, `bool()`, `int()` of a tensor)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@unittest.skipUnless(CONSISTENT_DECODING_AVAILABLE, "consistent decoding needs transformers 4.48 or later")
class DecodeStepCaptureTest(unittest.TestCase):
    """
    Compiling and capturing a decode step: `torch.compile` is refused (its kernels are not the verified ones); what
    capturing an eager decode step as a CUDA graph needs is checked here: no tensor read back to the host.
    """

    def test_torch_compile_is_refused_not_silently_inexact(self):
        # Generated kernels round unlike the verified ones (a compiled decode step was 1e-6 off the forward pass)
        model = tiny_llama_model(attn_implementation="sdpa")
        input_ids = random_tokens(21)
        for fullgraph in (False, True):
            torch._dynamo.reset()
            with self.subTest(fullgraph=fullgraph), patches.applied(consistent=True), torch.no_grad():
                cache = new_cache("static", model.config, max_cache_len=32)
                model(input_ids[:, :20], past_key_values=cache, cache_position=torch.arange(20))
                compiled_forward = torch.compile(model.forward, fullgraph=fullgraph, backend="eager")
                # Without fullgraph the refusal itself is raised; with it, torch.compile's error names it
                expected = "consistent_decoding_does_not_compile" if fullgraph else "runs eagerly only"
                with self.assertRaisesRegex(Exception, expected) as raised:
                    compiled_forward(input_ids[:, 20:], past_key_values=cache, cache_position=torch.tensor([20]))
                if not fullgraph:
                    self.assertIsInstance(raised.exception, patches.ConsistentDecodingCompileError)
        torch._dynamo.reset()

    def test_a_decode_step_reads_no_tensor_back_to_the_host(self):
        input_ids = random_tokens(41, vocab_size=1000)
        for family in ("llama", "phi3"):
            model = realistic_model(family, torch.float32, "sdpa")
            for kind in ("dynamic", "static"):
                with self.subTest(family=family, cache=kind), patches.applied(consistent=True), torch.no_grad():
                    cache = new_cache(kind, model.config, max_cache_len=64)
                    model(input_ids[:, :39], past_key_values=cache)
                    model(input_ids[:, 39:40], past_key_values=cache, cache_position=torch.tensor([39]))  # shapes seen
                    with _HostReadCounter() as host_reads:
                        model(input_ids[:, 40:41], past_key_values=cache, cache_position=torch.tensor([40]))
                self.assertEqual(host_reads.count, 0)


@unittest.skipUnless(CONSISTENT_DECODING_AVAILABLE, "consistent decoding needs transformers 4.48 or later")
class MachineCheckTest(unittest.TestCase):
    """`apply(consistent=True)` verifies the kernels on the running machine first."""

    def test_check_passes_here_and_names_the_products_chosen(self):
        consistent_decoding.verify_kernels()
        weight = torch.randn(1376, 512)
        self.assertIn(consistent_decoding.row_products_for(weight), consistent_decoding.ROW_PRODUCTS_BY_COST)

    def test_products_that_are_not_row_invariant_are_refused(self):
        # One product of all rows rounds rows differently by row count with MKL in fp32; alone it must be refused
        weight = torch.randn(96, 200)  # a shape of its own: the verdicts are cached per shape
        with mock.patch.object(consistent_decoding, "ROW_PRODUCTS_BY_COST", (consistent_decoding.RowProducts(1),)):
            with mock.patch.object(consistent_decoding, "_row_products", {}):
                if consistent_decoding._is_row_invariant(consistent_decoding.RowProducts(1), weight):
                    self.skipTest("one product is row-invariant on this machine's BLAS")
                with self.assertRaisesRegex(consistent_decoding.RowInvarianceError, "200x96"):
                    consistent_decoding.row_products_for(weight)

    def test_apply_refuses_and_changes_nothing_where_the_check_fails(self):
        linear_forward = torch.nn.Linear.forward
        failure = ["attention (torch.float32) of the query at position 5 differs in a decode step"]
        with mock.patch.object(consistent_decoding, "_check_attention", return_value=failure):
            with self.assertRaisesRegex(patches.ConsistentDecodingUnavailableError, "position 5"):
                patches.apply(consistent=True)
        self.assertIs(torch.nn.Linear.forward, linear_forward)
        self.assertFalse(patches.status().applied)
