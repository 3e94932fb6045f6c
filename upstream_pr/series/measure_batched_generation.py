"""
Measures what the description of the per-row pull request quotes, in the transformers tree it runs in: for a
left-padded batch whose padded row crosses the longrope switch four steps after the other, max |Δlogit| of each row
against that row alone, without cache, with the models of the pull request's own tests. Prints one JSON object.

    PYTHONPATH=<tree>/src python upstream_pr/series/measure_batched_generation.py <tree> <the pull request's test file>

Run as a script: it imports transformers and the test file only (as a module of the tree's tests).
"""

import json
import sys

import torch
from test_module_import import import_test_module


PADDING = 4


def batch(tester):
    prompt = tester.get_input_ids(tester.switch_length - 2)
    padded = torch.cat([torch.zeros_like(prompt[:, :PADDING]), prompt[:, PADDING:].flip(-1)], dim=-1)
    return torch.cat([prompt, padded])


@torch.no_grad()
def row_differences(tester, model_class) -> dict[str, str]:
    model = tester.get_model(model_class)
    input_ids = batch(tester)
    attention_mask = (input_ids != 0).long()
    outputs = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=10,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    generated, no_cache = [0.0, 0.0], [0.0, 0.0]
    for row, padding in enumerate((0, PADDING)):
        for step, logits in enumerate(outputs.logits):
            length = input_ids.shape[1] + step
            reference = model(outputs.sequences[row : row + 1, padding:length], use_cache=False).logits[0, -1]
            generated[row] = max(generated[row], (logits[row] - reference).abs().max().item())
            # The batch without cache, left-padded as `generate()` feeds it
            mask = torch.cat([attention_mask, torch.ones_like(outputs.sequences[:, input_ids.shape[1] : length])], -1)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            batched = model(
                outputs.sequences[:, :length], attention_mask=mask, position_ids=position_ids, use_cache=False
            )
            no_cache[row] = max(no_cache[row], (batched.logits[row, -1] - reference).abs().max().item())
    return {
        "generate(), row crossing first": f"{generated[0]:.1e}",
        "generate(), padded row crossing 4 steps later": f"{generated[1]:.1e}",
        "forward without cache, padded row": f"{no_cache[1]:.1e}",
    }


def main() -> None:
    from transformers import LlamaForCausalLM, Phi3ForCausalLM

    tester = import_test_module(*sys.argv[1:3]).LongRopeGenerationTester()
    results = {}
    for name, model_class in (("Llama", LlamaForCausalLM), ("Phi-3", Phi3ForCausalLM)):
        for path, difference in row_differences(tester, model_class).items():
            results[f"{name}, {path}"] = difference
    print(json.dumps(results))


if __name__ == "__main__":
    main()
