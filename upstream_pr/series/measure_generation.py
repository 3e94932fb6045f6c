"""
Measures what the description of the `generate()` pull request quotes, in the transformers tree it runs in: for each
decoding strategy across the longrope switch, max |Δlogit| against the forward pass without cache over the same
tokens, with the models of the pull request's own tests. Prints one JSON object.

    PYTHONPATH=<tree>/src python upstream_pr/series/measure_generation.py <tree> <the pull request's test file>

Run as a script: it imports transformers and the test file only (as a module of the tree's tests).
"""

import json
import sys

import torch
from test_module_import import import_test_module


STRATEGIES = {
    "greedy": {},
    "sampling": {"do_sample": True, "top_k": 0},
    "prompt lookup": {"prompt_lookup_num_tokens": 3},
    "assisted decoding": {"assistant": True},
    "caller's StaticCache": {"static": True},
}


def max_logit_difference(tester, model_class, strategy: dict) -> str:
    from transformers import StaticCache

    model = tester.get_model(model_class)
    input_ids = tester.get_input_ids(tester.switch_length // 2 - 2).repeat(1, 2)
    kwargs = {key: value for key, value in strategy.items() if key not in ("assistant", "static")}
    if strategy.get("assistant"):
        kwargs["assistant_model"] = tester.get_model(model_class)
    if strategy.get("static"):
        kwargs["cache"] = StaticCache(config=model.config, max_cache_len=input_ids.shape[1] + 10)
    torch.manual_seed(0)
    outputs = model.generate(
        input_ids,
        max_new_tokens=10,
        return_dict_in_generate=True,
        output_logits=True,
        **{"do_sample": False, **kwargs},
    )
    differences = []
    with torch.no_grad():
        for step, logits in enumerate(outputs.logits):
            reference = model(outputs.sequences[:, : input_ids.shape[1] + step], use_cache=False).logits[:, -1]
            differences.append((logits - reference).abs().max().item())
    kept = (
        "" if "cache" not in kwargs else (", cache kept" if outputs.cache is kwargs["cache"] else ", cache replaced")
    )
    return f"{max(differences):.1e}{kept}"


def main() -> None:
    from transformers import LlamaForCausalLM, Phi3ForCausalLM

    tester = import_test_module(*sys.argv[1:3]).LongRopeGenerationTester()
    results = {
        f"{name}, {strategy_name}": max_logit_difference(tester, model_class, strategy)
        for name, model_class in (("Llama", LlamaForCausalLM), ("Phi-3", Phi3ForCausalLM))
        for strategy_name, strategy in STRATEGIES.items()
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
