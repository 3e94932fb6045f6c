"""
What the patches cost, measured side by side in one process on a random-weight longrope Phi-3 (no downloads).

Every figure is a median over repeated runs after warm-up, with the min and max; each ratio divides two medians
taken in the same run, the two sides alternating so that drifts of the machine fall on both:

- decode step, patched / unpatched, far from the switch (the bookkeeping of an ordinary step);
- the step that crosses the switch with `stale_cache="recompute"`, divided by a plain prefill of the same length
  (one prefill is the physical limit of an exact recompute), and with `"rerotate"`;
- `generate()` across the switch, patched / unpatched, in tokens per second;
- a left-padded batch of 8 whose rows cross at 8 different steps: recomputing the crossing rows only, versus
  recomputing the whole batch whenever a row crosses;
- `consistent=True` against normal mode: prefill, decode step, whole generation; what dominates a decode step in
  each mode (profiled), and the operations (kernel launches on a GPU) of one decode step at a 4k context;
- the switch cost for several prefix lengths (a model per switch point, same weights): a table and a PNG.

Prints the tables and writes `bench.json` (and `switch_cost.png` when matplotlib is installed) to `--output-dir`.

    python scripts/benchmark.py --output-dir out/bench
    python scripts/benchmark.py --device cuda      # a Phi-3-mini-128k-shaped model in bf16
"""

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.utils._python_dispatch


# Run as `python scripts/benchmark.py` from the repository root, with or without make: the packages are there
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patches  # noqa: E402
import transformers
from patches.reference import LOGITS_TO_KEEP_ARGUMENT  # noqa: E402
from patches.tiny_models import (  # noqa: E402
    PHI3_MINI_128K_SHAPE,
    PHI3_MINI_SWITCH_POINT,
    SWITCH_POINT,
    TINY_DECODER,
    longrope_factor_profile,
    new_cache,
    random_tokens,
    tiny_phi3_config,
)
from transformers import Phi3ForCausalLM


MODEL_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

BENCH_MODELS = {
    # Big enough that a step is real work on a CPU (about 34M parameters), switching after 512 tokens
    "small-phi3": {
        "vocab_size": 8192,
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "switch_point": 512,
        "dtype": "fp32",
    },
    # Phi-3-mini-128k's shape, random weights
    "phi3-mini": {
        **{name: PHI3_MINI_128K_SHAPE[name] for name in (*MODEL_SIZES, "num_key_value_heads")},
        "switch_point": PHI3_MINI_SWITCH_POINT,
        "dtype": "bf16",
    },
    # The test suite's size, to check the script itself in seconds
    "tiny-phi3": {
        **{name: TINY_DECODER[name] for name in (*MODEL_SIZES, "num_key_value_heads")},
        "switch_point": SWITCH_POINT,
        "dtype": "fp32",
    },
}
"""Random-weight longrope Phi-3 models by name: config sizes, switch point (`original_max_position_embeddings`) and
dtype."""

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

BATCH_SIZE = 8
"""Rows of the batch benchmark; row `i` crosses the switch at decode step `2 * i + 1`."""


def build_model(name: str, switch_point: int, max_length: int, device: str, attention: str, seed: int = 0):
    """A random-weight longrope Phi-3 of `BENCH_MODELS[name]`'s sizes, switching after `switch_point` tokens."""
    sizes = dict(BENCH_MODELS[name])
    sizes.pop("switch_point")
    dtype = DTYPES[sizes.pop("dtype")]
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    config = tiny_phi3_config(
        switch_point=switch_point,
        longrope_factors=longrope_factor_profile(head_dim),
        max_position_embeddings=max(4 * switch_point, max_length),
        initializer_range=0.02,
        attn_implementation=attention,
        **sizes,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Phi3ForCausalLM(config)
    return model.to(dtype).eval()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def summary(seconds: list[float]) -> dict:
    return {"median_ms": 1e3 * statistics.median(seconds), "min_ms": 1e3 * min(seconds), "max_ms": 1e3 * max(seconds)}


def side_by_side(cases: dict, repeats: int, warmup: int, device: str) -> dict:
    """
    Times each case `warmup + repeats` times, the cases alternating. A case is `(context, setup, run)`: `setup()`
    runs untimed inside `context()` and returns the argument of `run`, which is timed (one or several durations).
    """
    seconds = {name: [] for name in cases}
    for repeat in range(warmup + repeats):
        for name, (context, setup, run) in cases.items():
            with context(), torch.no_grad():
                state = setup()
                durations = run(state)
            if repeat >= warmup:
                seconds[name].extend(durations)
    return {name: summary(times) for name, times in seconds.items()}


def timed(device: str, function, *args, **kwargs) -> float:
    synchronize(device)
    start = time.perf_counter()
    function(*args, **kwargs)
    synchronize(device)
    return time.perf_counter() - start


def prefilled_cache(model, input_ids):
    cache = new_cache("dynamic", model.config)
    model(input_ids, past_key_values=cache)
    return cache


def decode_steps(model, cache, tokens, device: str) -> list[float]:
    """Feeds `tokens` one at a time through `cache`; the duration of each step."""
    return [timed(device, model, tokens[:, i : i + 1], past_key_values=cache) for i in range(tokens.shape[1])]


def greedy_generate(model, prompt, new_tokens: int):
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )


def ratio(numerator: dict, denominator: dict) -> float:
    return numerator["median_ms"] / denominator["median_ms"]


def unpatched():
    return contextlib.nullcontext()


def patched(**apply_kwargs):
    def context():
        stack = contextlib.ExitStack()
        stack.enter_context(patches.applied(**apply_kwargs))
        # `warn` and `rerotate` say what they do once per cache; the benchmark knows
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", patches.StaleRopeCacheWarning)
        return stack

    return context


def bench_decode_step(model, args) -> dict:
    """
    Ordinary decode steps, a quarter of the switch point in: patched / unpatched. Each repeat decodes 16 steps on
    each side in turn; the ratio is the median over repeats of the ratio of their median steps, so that a drift of
    the machine falls on both sides of each pair.
    """
    prompt = random_tokens(args.switch_point // 4, vocab_size=model.config.vocab_size, seed=1).to(args.device)
    steps = random_tokens(16, vocab_size=model.config.vocab_size, seed=2).to(args.device)
    seconds = {"unpatched": [], "patched": []}
    paired_ratios = []
    for repeat in range(args.warmup + args.repeats):
        block = {}
        for name, context in (("unpatched", unpatched), ("patched", patched())):
            with context(), torch.no_grad():
                block[name] = decode_steps(model, prefilled_cache(model, prompt), steps, args.device)
        if repeat >= args.warmup:
            for name, durations in block.items():
                seconds[name].extend(durations)
            paired_ratios.append(statistics.median(block["patched"]) / statistics.median(block["unpatched"]))
    return {
        "timings": {name: summary(times) for name, times in seconds.items()},
        "ratio": statistics.median(paired_ratios),
    }


def bench_switch_step(model, switch_point: int, args) -> dict:
    """The step that crosses the switch (a cache of `switch_point` tokens, one more fed) under each policy, and a
    plain prefill of `switch_point + 1` tokens into an empty cache."""
    tokens = random_tokens(switch_point + 1, vocab_size=model.config.vocab_size, seed=3).to(args.device)
    prefix, crossing = tokens[:, :switch_point], tokens[:, switch_point:]

    def crossing_step(cache):
        return [timed(args.device, model, crossing, past_key_values=cache)]

    # The last token's logits only, as `generate()` prefills (and as the recompute returns the caller's logits only)
    last_logits_only = {LOGITS_TO_KEEP_ARGUMENT: 1} if LOGITS_TO_KEEP_ARGUMENT else {}

    def plain_prefill(_):
        cache = new_cache("dynamic", model.config)
        return [timed(args.device, model, tokens, past_key_values=cache, **last_logits_only)]

    cases = {
        "recompute": (patched(stale_cache="recompute"), lambda: prefilled_cache(model, prefix), crossing_step),
        "rerotate": (patched(stale_cache="rerotate"), lambda: prefilled_cache(model, prefix), crossing_step),
        "stale (upstream loop)": (unpatched, lambda: prefilled_cache(model, prefix), crossing_step),
        "plain prefill": (patched(), lambda: None, plain_prefill),
    }
    timings = side_by_side(cases, args.repeats, args.warmup, args.device)
    return {
        "prefix_length": switch_point,
        "timings": timings,
        "recompute / prefill": ratio(timings["recompute"], timings["plain prefill"]),
        "rerotate / recompute": ratio(timings["rerotate"], timings["recompute"]),
    }


def bench_generate(model, args) -> dict:
    """Greedy `generate()` from an eighth of the switch point before it to as far after it: patched / unpatched."""
    margin = args.switch_point // 8
    prompt = random_tokens(args.switch_point - margin, vocab_size=model.config.vocab_size, seed=4).to(args.device)
    new_tokens = 2 * margin

    def run(_):
        return [timed(args.device, greedy_generate, model, prompt, new_tokens)]

    timings = side_by_side(
        {"unpatched": (unpatched, lambda: None, run), "patched": (patched(), lambda: None, run)},
        args.repeats,
        args.warmup,
        args.device,
    )
    tokens_per_second = {name: 1e3 * new_tokens / timing["median_ms"] for name, timing in timings.items()}
    return {
        "new_tokens": new_tokens,
        "timings": timings,
        "tokens_per_second": tokens_per_second,
        "ratio": ratio(timings["patched"], timings["unpatched"]),
    }


def continuous_batch(model, prompts: list[list[int]], new_tokens: int) -> None:
    """`generate_batch` of `prompts`, greedy, synchronous batching (the CPU default), `new_tokens` each."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    generation_config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=0)
    config = ContinuousBatchingConfig(
        auto_switch_to_flash=False, use_async_batching=False, num_blocks=512, page_size=32, max_batch_tokens=512
    )
    model.generate_batch(
        prompts, generation_config=generation_config, continuous_batching_config=config, progress_bar=False
    )


def bench_continuous_batching(model, args) -> dict:
    """
    `generate_batch` throughput (generated tokens per second), patched / unpatched, on two mixed workloads of 8
    requests: none reaching the switch, and half crossing it while decoding (each prefilled again, patched); and the
    cost of that prefill: one crossing request, patched minus unpatched, against a plain prefill of its length.
    """
    from patches.coverage import CONTINUOUS_BATCHING_FROM, protects_continuous_batching

    if not protects_continuous_batching(transformers.__version__):
        return {"skipped": f"the patches protect continuous batching from transformers {CONTINUOUS_BATCHING_FROM}"}
    switch, new_tokens = args.switch_point, args.switch_point // 16
    vocab = model.config.vocab_size

    def prompts(lengths):
        return [
            random_tokens(length, vocab_size=vocab, seed=index)[0].tolist() for index, length in enumerate(lengths)
        ]

    workloads = {
        "no crossing": prompts([switch // 16 * k for k in range(1, 9)]),
        "half crossing": prompts([switch - new_tokens // 2] * 4 + [switch // 8 * k for k in range(1, 5)]),
    }
    results = {}
    for name, batch in workloads.items():

        def run(_, batch=batch):
            return [timed(args.device, continuous_batch, model, batch, new_tokens)]

        timings = side_by_side(
            {"unpatched": (unpatched, lambda: None, run), "patched": (patched(), lambda: None, run)},
            args.repeats,
            args.warmup,
            args.device,
        )
        generated = new_tokens * len(batch)
        results[name] = {
            "timings": timings,
            "tokens_per_second": {key: 1e3 * generated / timing["median_ms"] for key, timing in timings.items()},
            "throughput patched / unpatched": ratio(timings["unpatched"], timings["patched"]),
        }
    crossing = prompts([switch - 4])

    def crossing_run(_):
        return [timed(args.device, continuous_batch, model, crossing, 8)]

    def prefill(_):
        # What the re-prefill computes, through `generate_batch` as well: a request of the crossing one's length at
        # the switch (prompt and generated tokens), prefilled, one token generated
        return [timed(args.device, continuous_batch, model, [crossing[0] + [5] * 5], 1)]

    timings = side_by_side(
        {
            "crossing request, unpatched": (unpatched, lambda: None, crossing_run),
            "crossing request, patched": (patched(), lambda: None, crossing_run),
            "plain prefill": (unpatched, lambda: None, prefill),
        },
        args.repeats,
        args.warmup,
        args.device,
    )
    extra_ms = timings["crossing request, patched"]["median_ms"] - timings["crossing request, unpatched"]["median_ms"]
    results["re-prefill"] = {
        "timings": timings,
        "extra_ms": extra_ms,
        "extra / plain prefill": extra_ms / timings["plain prefill"]["median_ms"],
    }
    return results


def left_padded_rows(model, args):
    """A batch of `BATCH_SIZE` rows of different lengths, left-padded: row `i` crosses the switch at decode step
    `2 * i + 1`. Returns the prompt, its mask and the tokens fed at each step."""
    steps = 2 * BATCH_SIZE
    switch_point = model.config.original_max_position_embeddings
    prompt = random_tokens(switch_point, batch_size=BATCH_SIZE, vocab_size=model.config.vocab_size, seed=5)
    attention_mask = torch.ones_like(prompt)
    for row in range(BATCH_SIZE):
        attention_mask[row, : 2 * row] = 0
        prompt[row, : 2 * row] = 0
    fed = random_tokens(steps, batch_size=BATCH_SIZE, vocab_size=model.config.vocab_size, seed=6)
    return prompt.to(args.device), attention_mask.to(args.device), fed.to(args.device)


def batch_decode(model, prompt, attention_mask, fed, device: str, whole_batch: bool):
    """
    Decodes `fed` one token per step through a cache after `prompt`; returns the step durations and the last logits.
    `whole_batch`: when a row crosses the switch, the whole batch is run again without cache into a new cache (as
    `generate()` does upstream when it drops the cache); otherwise the patches recompute the crossing rows only.
    """
    sequence, mask = prompt, attention_mask
    row_lengths = attention_mask.sum(-1).tolist()
    switch_point = model.config.original_max_position_embeddings
    cache = prefilled_cache_with_mask(model, prompt, attention_mask)
    durations, logits = [], None
    for step in range(fed.shape[1]):
        sequence = torch.cat([sequence, fed[:, step : step + 1]], dim=-1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        crossing = any(length + step + 1 == switch_point + 1 for length in row_lengths)
        synchronize(device)
        start = time.perf_counter()
        if whole_batch and crossing:
            cache = new_cache("dynamic", model.config)
            logits = model(sequence, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
        else:
            logits = model(
                sequence[:, -1:], attention_mask=mask, position_ids=positions[:, -1:], past_key_values=cache
            ).logits
        synchronize(device)
        durations.append(time.perf_counter() - start)
    return durations, logits[:, -1]


def prefilled_cache_with_mask(model, prompt, attention_mask):
    cache = new_cache("dynamic", model.config)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    model(prompt, attention_mask=attention_mask, position_ids=positions, past_key_values=cache)
    return cache


def bench_batch(model, args) -> dict:
    """
    A batch of 8 whose rows cross at 8 different steps: crossing rows only / whole batch, over 16 steps. On a model
    switching at a quarter of the switch point (same weights), to keep the whole-batch side short.
    """
    switch_point = max(args.switch_point // 4, 4 * BATCH_SIZE)
    model = switching_at(model, switch_point, args)
    prompt, attention_mask, fed = left_padded_rows(model, args)
    last_logits = {}

    def run(whole_batch: bool):
        def steps(_):
            durations, last_logits[whole_batch] = batch_decode(
                model, prompt, attention_mask, fed, args.device, whole_batch
            )
            return [sum(durations)]

        return steps

    timings = side_by_side(
        {
            "crossing rows only": (patched(), lambda: None, run(False)),
            "whole batch": (patched(), lambda: None, run(True)),
        },
        args.repeats,
        args.warmup,
        args.device,
    )
    return {
        "switch_point": switch_point,
        "batch_size": BATCH_SIZE,
        "steps": fed.shape[1],
        "timings": timings,
        "ratio": ratio(timings["crossing rows only"], timings["whole batch"]),
        # Both strategies are exact: their logits agree to rounding
        "max_abs_logit_difference": (last_logits[False] - last_logits[True]).abs().max().item(),
    }


def bench_consistent(model, args) -> dict:
    """
    `consistent=True` against normal mode (both patched): prefill, decode step, whole generation (no switch); what
    dominates a decode step in each mode (profiled); and the operations of one decode step at a 4k context.
    """
    try:
        with patched(consistent=True)():
            pass
    except patches.ConsistentDecodingUnavailableError as error:  # a release before 4.48, or this machine's kernels
        return {"skipped": str(error)}
    vocab_size = model.config.vocab_size
    prompt = random_tokens(args.switch_point, vocab_size=vocab_size, seed=7).to(args.device)
    short_prompt = prompt[:, : args.switch_point // 4]
    steps = random_tokens(16, vocab_size=vocab_size, seed=8).to(args.device)
    new_tokens = 64
    results = {}
    measurements = {
        "prefill": (lambda: None, lambda _: [timed(args.device, model, prompt, use_cache=True)]),
        "decode step": (
            lambda: prefilled_cache(model, short_prompt),
            lambda cache: decode_steps(model, cache, steps, args.device),
        ),
        "generation": (lambda: None, lambda _: [timed(args.device, greedy_generate, model, short_prompt, new_tokens)]),
    }
    for name, (setup, run) in measurements.items():
        timings = side_by_side(
            {"normal": (patched(), setup, run), "consistent": (patched(consistent=True), setup, run)},
            args.repeats,
            args.warmup,
            args.device,
        )
        results[name] = {"timings": timings, "ratio": ratio(timings["consistent"], timings["normal"])}
    results["decode step profile"] = profile_decode_steps(model, short_prompt, steps, args.device)
    results["operations per decode step"] = count_decode_step_operations(model, args.device)
    results["decode-step attention"] = bench_decode_step_attention(model, args)
    return results


CONSISTENT_TARGETS = {"decode step": "≤ 1.20", "generation": "≤ 1.30"}
"""Issue 16's bounds on consistent mode's cost, on a CPU."""

PROFILED_OPERATORS = 8
"""Operators listed in the decode-step profile: those either mode spends the most time in."""


def profile_decode_steps(model, prompt, steps, device: str) -> dict:
    """
    Time per operator (self time, summed over `steps` fed one at a time after `prompt`) in each mode: what dominates a
    decode step. On CUDA the time is the kernels' time on the device.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    operators = {}
    for mode, apply_kwargs in {"normal": {}, "consistent": {"consistent": True}}.items():
        with patched(**apply_kwargs)(), torch.no_grad():
            cache = prefilled_cache(model, prompt)
            decode_steps(model, cache, steps[:, :2], device)  # warm-up
            with torch.profiler.profile(activities=activities) as profiler:
                decode_steps(model, cache, steps, device)
        for event in profiler.key_averages():
            self_us = event.self_device_time_total if device.startswith("cuda") else event.self_cpu_time_total
            operators.setdefault(event.key, {"normal": 0.0, "consistent": 0.0})[mode] = self_us / 1e3 / steps.shape[1]
    ranked = sorted(operators.items(), key=lambda item: max(item[1].values()), reverse=True)
    return {
        "steps": steps.shape[1],
        "per step ms": {name: dict(times) for name, times in ranked[:PROFILED_OPERATORS]},
        "total per step ms": {mode: sum(times[mode] for _, times in ranked) for mode in ("normal", "consistent")},
    }


ATTENTION_CONTEXTS = (128, 1024, 4096)
"""Key counts of the decode-step attention measured alone."""


def bench_decode_step_attention(model, args) -> dict:
    """
    The attention of one decode step alone, with the model's heads: consistent mode's function against
    `scaled_dot_product_attention` (what normal mode runs), and the operations of each (views aside).
    """
    from patches.consistent_decoding import consistent_sdpa_attention_forward

    config, dtype = model.config, next(model.parameters()).dtype
    head_dim = config.hidden_size // config.num_attention_heads
    groups = config.num_attention_heads // config.num_key_value_heads
    module = torch.nn.Module().eval()
    results = {}
    for key_length in ATTENTION_CONTEXTS:
        generator = torch.Generator().manual_seed(key_length)

        def random(heads, length):
            return torch.randn((1, heads, length, head_dim), generator=generator).to(args.device, dtype)

        query = random(config.num_attention_heads, 1)
        key, value = random(config.num_key_value_heads, key_length), random(config.num_key_value_heads, key_length)
        repeated_key, repeated_value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        functions = {
            "consistent": lambda: consistent_sdpa_attention_forward(module, query, key, value, None),
            "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(query, repeated_key, repeated_value),
        }
        cases = {
            name: (contextlib.nullcontext, lambda: None, _repeat_timed(function, args.device))
            for name, function in functions.items()
        }
        timings = side_by_side(cases, args.repeats, args.warmup, args.device)
        operations = {}
        for name, function in functions.items():
            with _OperationCounter() as counter:
                function()
            operations[name] = counter.count
        results[key_length] = {
            "timings": timings,
            "ratio": ratio(timings["consistent"], timings["sdpa"]),
            "operations": operations,
        }
    return results


ATTENTION_CALLS_PER_RUN = 20
"""Calls per timed run of the attention alone (one call is tens of microseconds)."""


def _repeat_timed(function, device: str):
    def run(_):
        return [timed(device, lambda: [function() for _ in range(ATTENTION_CALLS_PER_RUN)]) / ATTENTION_CALLS_PER_RUN]

    return run


HOST_READS = (
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
)
"""The operations behind `.item()`, `bool()` and `int()` of a tensor, and those whose output size depends on the data:
on a GPU each waits for the device, and none may run in a step captured as a CUDA graph."""


class _OperationCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """
    Counts the aten operations dispatched, views aside (on a GPU each is a kernel launch, or an allocation), and the
    tensors read back to the host.
    """

    def __init__(self):
        super().__init__()
        self.count = 0
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        if func in HOST_READS:
            self.host_reads += 1
        return func(*args, **(kwargs or {}))


DECODE_CONTEXT = 4096
"""The context of the decode step whose operations are counted."""


def count_decode_step_operations(model, device: str) -> dict:
    """Operations (views aside) and reads back to the host of one decode step after `DECODE_CONTEXT - 1` tokens."""
    context = min(DECODE_CONTEXT, model.config.max_position_embeddings) - 1
    tokens = random_tokens(context + 1, vocab_size=model.config.vocab_size, seed=9).to(device)
    with patched()(), torch.no_grad():
        cache = prefilled_cache(model, tokens[:, :context])
    counts = {"context": context + 1}
    for mode, apply_kwargs in {"normal": {}, "consistent": {"consistent": True}}.items():
        with patched(**apply_kwargs)(), torch.no_grad():
            step_cache = copy.deepcopy(cache)
            model(tokens[:, context:], past_key_values=step_cache)  # a first call checks the products' shapes
            step_cache = copy.deepcopy(cache)
            with _OperationCounter() as counter:
                model(tokens[:, context:], past_key_values=step_cache)
        counts[mode] = counter.count
        counts[f"{mode} host reads"] = counter.host_reads
    return counts


def bench_switch_cost(model, args) -> list[dict]:
    """`bench_switch_step` for each prefix length: a model switching there, with the same weights."""
    return [
        bench_switch_step(switching_at(model, prefix_length, args), prefix_length, args)
        for prefix_length in args.prefix_lengths
    ]


def switching_at(model, switch_point: int, args):
    """`model` (by reference) if it switches at `switch_point`, otherwise a model with its weights that does."""
    if model.config.original_max_position_embeddings == switch_point:
        return model
    switching_model = build_model(args.model, switch_point, 2 * max(args.prefix_lengths), args.device, args.attention)
    switching_model.load_state_dict(model.state_dict())
    return switching_model


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    facts = {"cpu": cpu, "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def format_timing(timing: dict) -> str:
    digits = 3 if timing["median_ms"] < 1 else 2
    return f"{timing['median_ms']:.{digits}f} ms ({timing['min_ms']:.{digits}f}-{timing['max_ms']:.{digits}f})"


def print_tables(results: dict) -> None:
    print(
        f"\n{results['model']} ({results['parameters'] / 1e6:.0f}M parameters, {results['dtype']}, "
        f"{results['attention']}, switch after {results['switch_point']} tokens) on {results['device']}: "
        f"{results['machine']['cpu']}, {results['machine']['torch_threads']} threads"
        f"{', ' + results['machine']['gpu'] if 'gpu' in results['machine'] else ''}; "
        f"transformers {results['transformers']}, torch {results['torch']}; medians of {results['repeats']} "
        "runs (min-max)\n"
    )
    rows = []
    for section, section_rows in ROW_BUILDERS.items():
        if section in results:
            rows += section_rows(results[section])
    print("| measurement | measured | against | ratio | target |")
    print("|---|---|---|---|---|")
    for name, measured, against, value, target in rows:
        print(f"| {name} | {format_timing(measured)} | {format_timing(against)} | {value:.3f} | {target} |")
    if "skipped" in results.get("consistent", {}):
        print(f"\nconsistent / normal: skipped ({results['consistent']['skipped']})")
    elif "consistent" in results:
        print_consistent_details(results["consistent"])
    if "skipped" in results.get("continuous_batching", {}):
        print(f"\ncontinuous batching: skipped ({results['continuous_batching']['skipped']})")
    if "generate" in results:
        print(f"\ngenerate() tokens per second: {results['generate']['tokens_per_second']}")
    if "continuous_batching" in results and "skipped" not in results["continuous_batching"]:
        for name, measured in results["continuous_batching"].items():
            if "tokens_per_second" in measured:
                print(f"generate_batch() tokens per second, {name}: {measured['tokens_per_second']}")
    if "batch" in results:
        difference = results["batch"]["max_abs_logit_difference"]
        print(f"batch: max |Δlogit| between the two strategies at the last step: {difference:.2e}")
    if "switch_cost" in results:
        print_switch_cost(results["switch_cost"])


def _decode_rows(decode: dict) -> list:
    return [("decode step, patched / unpatched", decode["timings"]["patched"], decode["timings"]["unpatched"],
             decode["ratio"], "≤ 1.01")]  # fmt: skip


def _switch_rows(switch: dict) -> list:
    return [
        ("switch step (recompute) / plain prefill", switch["timings"]["recompute"],
         switch["timings"]["plain prefill"], switch["recompute / prefill"], "≤ 1.10"),
        ("switch step, rerotate / recompute", switch["timings"]["rerotate"], switch["timings"]["recompute"],
         switch["rerotate / recompute"], ""),
    ]  # fmt: skip


def _generate_rows(generate: dict) -> list:
    return [(f"generate() across the switch, patched / unpatched ({generate['new_tokens']} tokens)",
             generate["timings"]["patched"], generate["timings"]["unpatched"], generate["ratio"], "")]  # fmt: skip


def _batch_rows(batch: dict) -> list:
    return [(f"batch of {batch['batch_size']} crossing at {batch['switch_point']} over {batch['steps']} steps: "
             "crossing rows only / whole batch", batch["timings"]["crossing rows only"],
             batch["timings"]["whole batch"], batch["ratio"], "")]  # fmt: skip


def _consistent_rows(consistent: dict) -> list:
    if "skipped" in consistent:
        return []
    return [
        (f"consistent / normal: {name}", measured["timings"]["consistent"], measured["timings"]["normal"],
         measured["ratio"], CONSISTENT_TARGETS.get(name, ""))
        for name, measured in consistent.items()
        if "timings" in measured
    ] + [
        (f"consistent / SDPA: decode-step attention alone, {key_length} keys", measured["timings"]["consistent"],
         measured["timings"]["sdpa"], measured["ratio"], "")
        for key_length, measured in consistent.get("decode-step attention", {}).items()
    ]  # fmt: skip


def print_consistent_details(consistent: dict) -> None:
    """What dominates a decode step in each mode, and the operations of a decode step at a 4k context."""
    profile = consistent["decode step profile"]
    print(f"\nWhere a decode step's time goes (self time per step, mean of {profile['steps']} profiled steps):\n")
    print("| operator | consistent | normal |")
    print("|---|---|---|")
    for name, times in profile["per step ms"].items():
        print(f"| {name} | {times['consistent']:.3f} ms | {times['normal']:.3f} ms |")
    total = profile["total per step ms"]
    print(f"| all operators | {total['consistent']:.3f} ms | {total['normal']:.3f} ms |")
    attention = consistent["decode-step attention"]
    counts = ", ".join(
        f"{key_length} keys {measured['operations']['consistent']} (SDPA {measured['operations']['sdpa']})"
        for key_length, measured in attention.items()
    )
    print(f"\nOperations of the decode-step attention alone (views aside): {counts}")
    operations = consistent["operations per decode step"]
    print(
        f"\nOperations of one decode step at a {operations['context']}-token context (views aside; on a GPU, kernel "
        f"launches): consistent {operations['consistent']}, normal {operations['normal']}; tensors read back to the "
        f"host: consistent {operations['consistent host reads']}, normal {operations['normal host reads']}"
    )


def _continuous_batching_rows(measured: dict) -> list:
    if "skipped" in measured:
        return []
    rows = [
        (f"generate_batch() throughput, {name}: patched / unpatched", workload["timings"]["patched"],
         workload["timings"]["unpatched"], workload["throughput patched / unpatched"],
         "≥ 0.95" if name == "no crossing" else "")
        for name, workload in measured.items()
        if "throughput patched / unpatched" in workload
    ]  # fmt: skip
    reprefill = measured["re-prefill"]
    timings = reprefill["timings"]
    rows += [
        ("one crossing request, patched / unpatched", timings["crossing request, patched"],
         timings["crossing request, unpatched"],
         ratio(timings["crossing request, patched"], timings["crossing request, unpatched"]), ""),
        (f"its re-prefill ({reprefill['extra_ms']:.0f} ms more) / a plain prefill of its length", timings["plain prefill"],
         timings["plain prefill"], reprefill["extra / plain prefill"], ""),
    ]  # fmt: skip
    return rows


ROW_BUILDERS = {
    "decode_step": _decode_rows,
    "switch_step": _switch_rows,
    "generate": _generate_rows,
    "batch": _batch_rows,
    "consistent": _consistent_rows,
    "continuous_batching": _continuous_batching_rows,
}
"""How each section's measurements read in the table, in the table's order."""


def print_switch_cost(switch_cost: list[dict]) -> None:
    print("\n| prefix length | recompute | plain prefill | recompute / prefill | rerotate | stale (upstream loop) |")
    print("|---|---|---|---|---|---|")
    for row in switch_cost:
        timings = row["timings"]
        print(
            f"| {row['prefix_length']} | {format_timing(timings['recompute'])} | "
            f"{format_timing(timings['plain prefill'])} | {row['recompute / prefill']:.3f} | "
            f"{format_timing(timings['rerotate'])} | {format_timing(timings['stale (upstream loop)'])} |"
        )


def plot_switch_cost(path: Path, rows: list[dict], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lengths = [row["prefix_length"] for row in rows]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name in ("recompute", "plain prefill", "rerotate", "stale (upstream loop)"):
        axes.plot(lengths, [row["timings"][name]["median_ms"] for row in rows], marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(lengths, [str(length) for length in lengths])
    axes.set_xlabel("prefix length at the switch (tokens)")
    axes.set_ylabel("step time (ms, median)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


SECTIONS = ("decode_step", "switch_step", "generate", "batch", "consistent", "switch_cost", "continuous_batching")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="`cpu` (default) or `cuda`")
    parser.add_argument(
        "--model",
        choices=sorted(BENCH_MODELS),
        help="random-weight model sizes (default: small-phi3 on CPU, phi3-mini on CUDA)",
    )
    parser.add_argument("--attention", default="sdpa", choices=("eager", "sdpa"))
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before them (default 2)")
    parser.add_argument(
        "--prefix-lengths",
        type=int,
        nargs="+",
        help="prefix lengths of the switch-cost table (default: 1/2, 1, 2 and 4 times the switch point)",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("out/bench"))
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        help="measure only these (default: all); the tables print what was measured",
    )
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA device")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    args.model = args.model or ("phi3-mini" if args.device.startswith("cuda") else "small-phi3")
    args.switch_point = BENCH_MODELS[args.model]["switch_point"]
    args.prefix_lengths = sorted(args.prefix_lengths or [args.switch_point * k // 2 for k in (1, 2, 4, 8)])
    if min(args.prefix_lengths) < 2:
        parser.error("--prefix-lengths must be at least 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    if patches.status().applied:
        raise SystemExit("error: the patches are already applied in this process; the benchmark applies them itself")
    model = build_model(args.model, args.switch_point, 2 * max(args.prefix_lengths), args.device, args.attention)
    results = {
        "model": args.model,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "dtype": BENCH_MODELS[args.model]["dtype"],
        "attention": args.attention,
        "switch_point": args.switch_point,
        "device": args.device,
        "machine": machine(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    sections = {
        "decode_step": lambda: bench_decode_step(model, args),
        "switch_step": lambda: bench_switch_step(model, args.switch_point, args),
        "generate": lambda: bench_generate(model, args),
        "batch": lambda: bench_batch(model, args),
        "consistent": lambda: bench_consistent(model, args),
        "switch_cost": lambda: bench_switch_cost(model, args),
        "continuous_batching": lambda: bench_continuous_batching(model, args),
    }
    for name, measure in sections.items():
        if args.sections and name not in args.sections:
            continue
        print(f"measuring {name}...", flush=True)
        results[name] = measure()
    print_tables(results)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / "bench.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {json_path}")
    title = f"Cost of the longrope switch, {args.model} {results['dtype']} on {args.device}"
    if "switch_cost" not in results:
        return
    if plot_switch_cost(args.output_dir / "switch_cost.png", results["switch_cost"], title):
        print(f"wrote {args.output_dir / 'switch_cost.png'}")
    else:
        print("matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
