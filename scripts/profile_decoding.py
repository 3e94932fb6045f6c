"""
What a decode step runs in normal mode and in consistent mode (`patches.apply(consistent=True)`), on the benchmark's
random-weight longrope Phi-3 (no downloads):

- where its time goes: the operators either mode spends the most self time in (`torch.profiler`), per step, over 16
  steps fed one at a time after a quarter of the switch point (on a GPU, the kernels' time on the device);
- the operations of one decode step at a 4k context, views aside, and the tensors it reads back to the host (on a GPU
  each read waits for the device, and none may run in a step captured as a CUDA graph);
- the operations of the decode-step attention alone: consistent mode's against `scaled_dot_product_attention`.

Prints the tables and writes `profile.json` to `--output-dir`. `make bench` reports the same figures in its
`consistent` section, measured by this module's functions, next to the timings.

    python scripts/profile_decoding.py --output-dir out/profile
    python scripts/profile_decoding.py --device cuda      # a Phi-3-mini-128k-shaped model in bf16
"""

import argparse
import copy
import functools
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch


# Run as `python scripts/profile_decoding.py` from the repository root, with or without make: the packages are there
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patches  # noqa: E402
from patches.consistent_decoding import consistent_sdpa_attention_forward  # noqa: E402
from patches.tiny_models import new_cache, random_tokens  # noqa: E402
from scripts.bench_models import BENCH_MODELS, build_model, default_model, describe_run  # noqa: E402


MODES = {"normal": {}, "consistent": {"consistent": True}}
"""The two modes compared, by name: `patches.applied`'s arguments for each."""

DECODE_STEPS = 16
"""Decode steps profiled, fed one at a time."""

PROFILED_OPERATORS = 8
"""Operators listed in the decode-step profile: those either mode spends the most time in."""

DECODE_CONTEXT = 4096
"""The context of the decode step whose operations are counted (the model's longest, if shorter)."""

ATTENTION_CONTEXTS = (128, 1024, 4096)
"""Key counts of the decode-step attention measured alone."""


def consistent_mode_unavailable() -> str | None:
    """Why `consistent=True` cannot be applied here (a release before 4.48, or this machine's kernels), or `None`."""
    try:
        with patches.applied(consistent=True):
            pass
    except patches.ConsistentDecodingUnavailableError as error:
        return str(error)
    return None


def prefilled_cache(model, input_ids):
    """A dynamic cache holding `input_ids`, fed through `model` in one pass."""
    cache = new_cache("dynamic", model.config)
    model(input_ids, past_key_values=cache)
    return cache


def decode_inputs(model, device: str):
    """
    The prompt, a quarter of the switch point, and the `DECODE_STEPS` tokens fed after it one at a time: the decode
    steps profiled here and timed by the benchmark's `consistent` section (whose prefill the prompt begins).
    """
    switch_point, vocab_size = model.config.original_max_position_embeddings, model.config.vocab_size
    prompt = random_tokens(switch_point, vocab_size=vocab_size, seed=7)[:, : switch_point // 4]
    steps = random_tokens(DECODE_STEPS, vocab_size=vocab_size, seed=8)
    return prompt.to(device), steps.to(device)


def feed_one_at_a_time(model, cache, tokens) -> None:
    for index in range(tokens.shape[1]):
        model(tokens[:, index : index + 1], past_key_values=cache)


def profile_decode_steps(model, prompt, steps, device: str) -> dict:
    """
    Time per operator (self time, summed over `steps` fed one at a time after `prompt`) in each mode: what dominates a
    decode step. On CUDA the time is the kernels' time on the device.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    operators = {}
    for mode, apply_kwargs in MODES.items():
        with patches.applied(**apply_kwargs), torch.no_grad():
            cache = prefilled_cache(model, prompt)
            feed_one_at_a_time(model, cache, steps[:, :2])  # warm-up
            with torch.profiler.profile(activities=activities) as profiler:
                feed_one_at_a_time(model, cache, steps)
        for event in profiler.key_averages():
            self_us = event.self_device_time_total if device.startswith("cuda") else event.self_cpu_time_total
            operators.setdefault(event.key, dict.fromkeys(MODES, 0.0))[mode] = self_us / 1e3 / steps.shape[1]
    ranked = sorted(operators.items(), key=lambda item: max(item[1].values()), reverse=True)
    return {
        "steps": steps.shape[1],
        "per step ms": {name: dict(times) for name, times in ranked[:PROFILED_OPERATORS]},
        "total per step ms": {mode: sum(times[mode] for _, times in ranked) for mode in MODES},
    }


# Operations are counted from a `torch.profiler` trace. torch has no public `TorchDispatchMode` (2.13 has it in the
# private `torch.utils._python_dispatch` only), and the public `torch.overrides.TorchFunctionMode` sees Python-level
# calls, reads of a tensor's attributes among them, not operations. A trace records every aten operation with what
# it runs beneath it: the operations the code calls are its outermost aten events.

HOST_READS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::masked_select")
"""The operations behind `.item()`, `bool()` and `int()` of a tensor, and those whose output size depends on the data:
on a GPU each waits for the device, and none may run in a step captured as a CUDA graph."""


class OperationCount(NamedTuple):
    operations: int
    host_reads: int


def count_operations(function) -> OperationCount:
    """
    The aten operations `function()` calls, views aside, and the tensors read back to the host, from a profile of one
    call. An operation counts once, whatever it runs beneath it (`aten::linear` is one, not its transpose and its
    product); one that may return a view (`to`, `reshape`, `contiguous`) counts the copy it makes, if it makes one.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        function()
    outermost = [event for event in profiler.events() if event.cpu_parent is None]
    return OperationCount(sum(map(_operations, outermost)), sum(map(_host_reads, outermost)))


def _operations(event) -> int:
    if event.name.startswith("aten::") and not _may_return_a_view(event.name):
        return 1
    return sum(map(_operations, event.cpu_children))


def _host_reads(event) -> int:
    if event.name in HOST_READS:
        return 1
    return sum(map(_host_reads, event.cpu_children))


UNANNOTATED_VIEWS = ("aten::_unsafe_view",)
"""Operations that return a view without saying so in their schema (`reshape` ends with one, after its copy)."""


@functools.cache
def _may_return_a_view(name: str) -> bool:
    """Whether an overload of aten operation `name` returns a view of its input (a trace names no overload)."""
    if name in UNANNOTATED_VIEWS:
        return True
    operation = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    return operation is not None and any(getattr(operation, overload).is_view for overload in operation.overloads())


def count_decode_step_operations(model, device: str) -> dict:
    """Operations (views aside) and reads back to the host of one decode step after `DECODE_CONTEXT - 1` tokens."""
    context = min(DECODE_CONTEXT, model.config.max_position_embeddings) - 1
    tokens = random_tokens(context + 1, vocab_size=model.config.vocab_size, seed=9).to(device)
    with patches.applied(), torch.no_grad():
        cache = prefilled_cache(model, tokens[:, :context])
    counts = {"context": context + 1}
    for mode, apply_kwargs in MODES.items():
        with patches.applied(**apply_kwargs), torch.no_grad():
            model(
                tokens[:, context:], past_key_values=copy.deepcopy(cache)
            )  # a first call checks the products' shapes
            step_cache = copy.deepcopy(cache)
            counted = count_operations(lambda: model(tokens[:, context:], past_key_values=step_cache))
        counts[mode] = counted.operations
        counts[f"{mode} host reads"] = counted.host_reads
    return counts


def decode_step_attention(model, key_length: int, device: str) -> dict:
    """
    The attention of one decode step over `key_length` random keys, with the model's heads, as two functions by name:
    consistent mode's, and `scaled_dot_product_attention` (what normal mode runs, the keys repeated for each group).
    """
    config, dtype = model.config, next(model.parameters()).dtype
    head_dim = config.hidden_size // config.num_attention_heads
    groups = config.num_attention_heads // config.num_key_value_heads
    generator = torch.Generator().manual_seed(key_length)

    def random(heads, length):
        return torch.randn((1, heads, length, head_dim), generator=generator).to(device, dtype)

    query = random(config.num_attention_heads, 1)
    key, value = random(config.num_key_value_heads, key_length), random(config.num_key_value_heads, key_length)
    repeated_key, repeated_value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    module = torch.nn.Module().eval()
    return {
        "consistent": lambda: consistent_sdpa_attention_forward(module, query, key, value, None),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(query, repeated_key, repeated_value),
    }


def count_attention_operations(model, device: str) -> dict:
    """The operations (views aside) of the decode-step attention alone, each way, at each of `ATTENTION_CONTEXTS`."""
    return {
        key_length: {
            name: count_operations(function).operations
            for name, function in decode_step_attention(model, key_length, device).items()
        }
        for key_length in ATTENTION_CONTEXTS
    }


def print_decode_step_profile(profile: dict) -> None:
    print(f"\nWhere a decode step's time goes (self time per step, mean of {profile['steps']} profiled steps):\n")
    print("| operator | consistent | normal |")
    print("|---|---|---|")
    for name, times in profile["per step ms"].items():
        print(f"| {name} | {times['consistent']:.3f} ms | {times['normal']:.3f} ms |")
    total = profile["total per step ms"]
    print(f"| all operators | {total['consistent']:.3f} ms | {total['normal']:.3f} ms |")


def print_attention_operations(operations: dict) -> None:
    """`operations`: by key count, the operations of consistent mode's attention and of SDPA's."""
    counts = ", ".join(
        f"{key_length} keys {counted['consistent']} (SDPA {counted['sdpa']})"
        for key_length, counted in operations.items()
    )
    print(f"\nOperations of the decode-step attention alone (views aside): {counts}")


def print_decode_step_operations(operations: dict) -> None:
    print(
        f"\nOperations of one decode step at a {operations['context']}-token context (views aside; on a GPU, each "
        f"launches a kernel or a few): consistent {operations['consistent']}, normal {operations['normal']}; tensors "
        f"read back to the host: consistent {operations['consistent host reads']}, normal "
        f"{operations['normal host reads']}"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="`cpu` (default) or `cuda`")
    parser.add_argument(
        "--model",
        choices=sorted(BENCH_MODELS),
        help="random-weight model sizes of scripts/benchmark.py (default: small-phi3 on CPU, phi3-mini on CUDA)",
    )
    parser.add_argument("--attention", default="sdpa", choices=("eager", "sdpa"))
    parser.add_argument("--output-dir", type=Path, default=Path("out/profile"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA device")
    args.model = args.model or default_model(args.device)
    args.switch_point = BENCH_MODELS[args.model]["switch_point"]
    return args


def main(argv=None):
    args = parse_args(argv)
    if patches.status().applied:
        raise SystemExit("error: the patches are already applied in this process; the profile applies them itself")
    model = build_model(args.model, args.switch_point, DECODE_CONTEXT, args.device, args.attention)
    results = describe_run(model, args)
    unavailable = consistent_mode_unavailable()
    if unavailable:
        results["skipped"] = unavailable
        print(f"consistent mode is unavailable here: {unavailable}")
    else:
        prompt, steps = decode_inputs(model, args.device)
        results["decode step profile"] = profile_decode_steps(model, prompt, steps, args.device)
        results["operations per decode step"] = count_decode_step_operations(model, args.device)
        results["decode-step attention operations"] = count_attention_operations(model, args.device)
        print(
            f"{args.model} ({results['dtype']}, {args.attention}) on {args.device}, transformers {results['transformers']}"
        )
        print_decode_step_profile(results["decode step profile"])
        print_attention_operations(results["decode-step attention operations"])
        print_decode_step_operations(results["operations per decode step"])

    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / "profile.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {json_path}")


if __name__ == "__main__":
    main()
