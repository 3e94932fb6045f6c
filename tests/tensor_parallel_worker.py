"""
One rank of `tests/test_tensor_parallel.py`, run under `torchrun`: loads the tiny longrope Phi-3 saved at `argv[1]`
with the model's own tensor-parallel plan (`tp_plan="auto"`) and decodes across the switch in a hand-written loop,
upstream's and patched. Rank 0 prints the measurements as one JSON line after `RESULT_MARKER`.
"""

import inspect
import json
import sys

import torch
import torch.distributed as dist

import patches
import transformers
from tests.cache_consistency_utils import (
    SWITCH_POINT,
    hand_written_loop_errors,
    new_cache,
    no_cache_logits,
    random_tokens,
)
from transformers import Phi3ForCausalLM


RESULT_MARKER = "TENSOR_PARALLEL_RESULT "


def tensor_parallel_arguments() -> dict:
    """`from_pretrained` arguments for the model's TP plan: a `DistributedConfig` where it takes one, or `tp_plan`."""
    distributed_config = getattr(transformers, "DistributedConfig", None)
    if distributed_config is not None and "tp_plan" in inspect.signature(distributed_config).parameters:
        return {"distributed_config": distributed_config(tp_plan="auto")}
    return {"tp_plan": "auto"}


def local_rows(weight) -> int:
    """Rows of the shard this rank holds (the whole weight if it is not a `DTensor`)."""
    return (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0]


@torch.no_grad()
def main(model_directory: str) -> None:
    model = Phi3ForCausalLM.from_pretrained(model_directory, **tensor_parallel_arguments()).eval()
    # Every rank runs the same forward passes: the sharded layers communicate in each of them
    tokens = random_tokens(SWITCH_POINT + 8, vocab_size=model.config.vocab_size)
    prompt_length = SWITCH_POINT - 4
    upstream, _ = hand_written_loop_errors(
        model, tokens, prompt_length, past_key_values=new_cache("dynamic", model.config)
    )
    with patches.applied():
        patched, _ = hand_written_loop_errors(
            model, tokens, prompt_length, past_key_values=new_cache("dynamic", model.config)
        )
    tensor_parallel_logits = no_cache_logits(model, tokens)

    if dist.get_rank() == 0:
        # The same weights in one process, without tensor parallelism
        single = Phi3ForCausalLM.from_pretrained(model_directory).eval()
        qkv_proj = model.model.layers[0].self_attn.qkv_proj
        result = {
            "world_size": dist.get_world_size(),
            "qkv_proj_rows": [local_rows(qkv_proj.weight), qkv_proj.out_features],
            "single_process_difference": (tensor_parallel_logits - no_cache_logits(single, tokens)).abs().max().item(),
            "upstream": upstream,
            "patched": patched,
        }
        print(RESULT_MARKER + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
