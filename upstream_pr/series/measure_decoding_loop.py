"""
Measures what the description of the decoding-loop pull request quotes, in the transformers tree it runs in: for a
decoding loop across the longrope switch, max |Δlogit| against the forward pass without cache over the same tokens,
with the model of the pull request's own tests. Prints one JSON object.

    PYTHONPATH=<tree>/src python upstream_pr/series/measure_decoding_loop.py <tree> <the pull request's test file>

Run as a script: it imports transformers and the test file only (as a module of the tree's tests).
"""

import json
import sys

import torch
from test_module_import import import_test_module


def loop_difference(case, cache_kind: str, chunk_size: int = 1, crop: bool = False) -> str:
    from transformers import DynamicCache, Phi3ForCausalLM, StaticCache

    model = case.model_tester.get_model(Phi3ForCausalLM)
    input_ids = case.model_tester.get_input_ids(case.switch_length + 8)
    if cache_kind == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=input_ids.shape[1])
    start = case.switch_length - 4
    if crop:
        model(input_ids[:, : case.switch_length + 4], cache=cache)
        cache.crop(-6)
        start = case.switch_length - 2
    else:
        model(input_ids[:, :start], cache=cache)
    differences = []
    for position in range(start, input_ids.shape[1], chunk_size):
        logits = model(input_ids[:, position : position + chunk_size], cache=cache).logits
        for offset in range(logits.shape[1]):
            reference = model(input_ids[:, : position + offset + 1], use_cache=False).logits[:, -1]
            differences.append((logits[:, offset] - reference).abs().max().item())
    return f"{max(differences):.1e}"


def main() -> None:
    case = import_test_module(*sys.argv[1:3]).Phi3LongRopeDecodingLoopTest()
    case.setUp()
    with torch.no_grad():
        results = {
            "Phi-3, DynamicCache, one token a step": loop_difference(case, "dynamic"),
            "Phi-3, caller's StaticCache, one token a step": loop_difference(case, "static"),
            "Phi-3, DynamicCache, four tokens a step": loop_difference(case, "dynamic", chunk_size=4),
            "Phi-3, DynamicCache cropped back below the switch": loop_difference(case, "dynamic", crop=True),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
