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
Helpers of the slow tests: models of real checkpoints' shapes with random weights (nothing is downloaded), local
checkpoints, and the measurements made on them.
"""

import os

import torch

from patches.reference import first_token_divergence, last_logits_without_cache  # noqa: F401
from transformers import LlamaConfig, LlamaForCausalLM, Phi3ForCausalLM

from .cache_consistency_utils import (
    LLAMA_7B_SHAPE,
    PHI3_MINI_128K_SHAPE,
    PHI3_MINI_SWITCH_POINT,
    TRANSFORMERS_VERSION,
    longrope_factor_profile,
    new_cache,
    tiny_phi3_config,
)


CHECKPOINTS = {
    "phi3-mini-128k": ("PHI3_MINI_128K_PATH", "microsoft/Phi-3-mini-128k-instruct"),
    "phi3.5-mini": ("PHI3_5_MINI_PATH", "microsoft/Phi-3.5-mini-instruct"),
    "phi4-mini": ("PHI4_MINI_PATH", "microsoft/Phi-4-mini-instruct"),
    "llama": ("LLAMA_CHECKPOINT_PATH", "meta-llama/Llama-3.2-1B-Instruct"),
}
"""Checkpoints of the slow tests: `name -> (environment variable giving a local path, hub id looked up in the local
hub cache)`."""


def real_size_phi3_model(device, dtype=torch.bfloat16, seed: int = 0, **overrides) -> Phi3ForCausalLM:
    """A Phi-3 of Phi-3-mini-128k's shape with random weights and `longrope_factor_profile`, in eval mode."""
    sizes = {**PHI3_MINI_128K_SHAPE, **overrides}
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    config = tiny_phi3_config(
        switch_point=PHI3_MINI_SWITCH_POINT,
        longrope_factors=longrope_factor_profile(head_dim),
        initializer_range=0.02,
        attn_implementation="sdpa",
        **sizes,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Phi3ForCausalLM(config)
    return model.to(dtype).eval()


def real_size_llama_model(device, dtype=torch.float32, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A Llama of Llama-2-7B's shape with random weights, in eval mode."""
    config = LlamaConfig(**{**LLAMA_7B_SHAPE, **overrides}, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def local_checkpoint(name: str) -> tuple[str | None, str]:
    """
    The local path of the checkpoint `name` of `CHECKPOINTS` (from its environment variable, or the local hub cache;
    nothing is downloaded), or `None` and the reason it is not there.
    """
    environment_variable, repo_id = CHECKPOINTS[name]
    path = os.environ.get(environment_variable)
    if path:
        if not os.path.isdir(path):
            return None, f"{environment_variable}={path} is not a directory"
        return path, ""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True), ""
    except LocalEntryNotFoundError:
        return None, f"{repo_id} is not in the local hub cache and {environment_variable} is not set"


def load_checkpoint(path: str, device, dtype=torch.bfloat16):
    """A causal LM and its tokenizer from a local checkpoint (sdpa attention, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype_argument = {"dtype" if TRANSFORMERS_VERSION.release >= (4, 56) else "torch_dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="sdpa", local_files_only=True, **dtype_argument
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer


def long_text_ids(tokenizer, length: int, device) -> torch.LongTensor:
    """`length` token ids of plain English text (numbered sentences), for prompts of a given length."""
    sentences = " ".join(
        f"Sentence number {i} of this long document says that the river passed the {i % 7}th mill at dawn."
        for i in range(length)
    )
    ids = tokenizer(sentences, return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] < length:
        raise ValueError(f"the text gave {ids.shape[1]} tokens, fewer than the {length} asked for")
    return ids.to(device)


@torch.no_grad()
def decode_step_errors(model, input_ids, prompt_length: int) -> dict[int, float]:
    """
    Prefills `input_ids[:, :prompt_length]` into a cache, then feeds the rest one token at a time; returns, for each
    sequence length reached, the max |Δlogit| of the decode step against the forward pass without cache.
    """
    cache = new_cache("dynamic", model.config)
    model(input_ids[:, :prompt_length], past_key_values=cache)
    errors = {}
    for length in range(prompt_length + 1, input_ids.shape[1] + 1):
        step_logits = model(input_ids[:, length - 1 : length], past_key_values=cache).logits[:, -1].float()
        reference = last_logits_without_cache(model, input_ids[:, :length])
        errors[length] = (step_logits - reference).abs().max().item()
    return errors
