"""
What the patches cost, measured side by side in one process on a random-weight longrope Phi-3 (no downloads).

Every figure is a median over repeated runs after warm-up, with the min and max; each ratio divides two medians
taken in the same run, the two sides alternating so that drifts of the machine fall on both. What is measured is
the table of sections at the end (`SECTIONS`, listed by `--help`): each names what it measures, the function that
measures it, its rows of the cost table and their targets. Consistent mode's section also reports what dominates a
decode step in each mode and the operations of one at a 4k context, measured by `scripts/profile_decoding.py`
(`make profile` runs it alone).

Prints the tables and writes `bench.json` (and `switch_cost.png` when matplotlib is installed) to `--output-dir`.

    python scripts/benchmark.py --output-dir out/bench
    python scripts/benchmark.py --device cuda      # a Phi-3-mini-128k-shaped model in bf16
"""

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


# Run as `python scripts/benchmark.py` from the repository root, with or without make: the packages are there
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patches  # noqa: E402
import transformers
from patches.coverage import CONTINUOUS_BATCHING_FROM, protects_continuous_batching  # noqa: E402
from patches.reference import LOGITS_TO_KEEP_ARGUMENT  # noqa: E402
from patches.rope_cache_utils import positions_from_attention_mask  # noqa: E402
from patches.tiny_models import new_cache, random_tokens  # noqa: E402
from scripts.bench_models import BENCH_MODELS, build_model, default_model, describe_run  # noqa: E402
from scripts.profile_decoding import (  # noqa: E402
    ATTENTION_CONTEXTS,
    consistent_mode_unavailable,
    count_decode_step_operations,
    count_operations,
    decode_inputs,
    decode_step_attention,
    prefilled_cache,
    print_attention_operations,
    print_decode_step_operations,
    print_decode_step_profile,
    profile_decode_steps,
)


BATCH_SIZE = 8
"""Rows of the batch benchmark; row `i` crosses the switch at decode step `2 * i + 1`."""


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


def patched_and_unpatched(run) -> dict:
    """The cases of `side_by_side` that time `run` unpatched and patched, with nothing to set up."""
    return {"unpatched": (unpatched, lambda: None, run), "patched": (patched(), lambda: None, run)}


# Measurements: one function per section of `SECTIONS`, each `(model, args) -> dict`, what `bench.json` holds under
# the section's name


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


def bench_switch_step(model, args) -> dict:
    return switch_step_at(model, args.switch_point, args)


def switch_step_at(model, switch_point: int, args) -> dict:
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

    timings = side_by_side(patched_and_unpatched(run), args.repeats, args.warmup, args.device)
    tokens_per_second = {name: 1e3 * new_tokens / timing["median_ms"] for name, timing in timings.items()}
    return {
        "new_tokens": new_tokens,
        "timings": timings,
        "tokens_per_second": tokens_per_second,
        "ratio": ratio(timings["patched"], timings["unpatched"]),
    }


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
        positions = positions_from_attention_mask(mask)
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
    positions = positions_from_attention_mask(attention_mask)
    model(prompt, attention_mask=attention_mask, position_ids=positions, past_key_values=cache)
    return cache


def bench_consistent(model, args) -> dict:
    """
    `consistent=True` against normal mode (both patched): prefill, decode step, whole generation (no switch); what
    dominates a decode step in each mode (profiled), the operations of one decode step at a 4k context, and the
    decode-step attention alone (`scripts/profile_decoding.py` profiles and counts).
    """
    unavailable = consistent_mode_unavailable()
    if unavailable:
        return {"skipped": unavailable}
    prompt = random_tokens(args.switch_point, vocab_size=model.config.vocab_size, seed=7).to(args.device)
    short_prompt, steps = decode_inputs(model, args.device)
    new_tokens = 64
    measurements = {
        "prefill": (lambda: None, lambda _: [timed(args.device, model, prompt, use_cache=True)]),
        "decode step": (
            lambda: prefilled_cache(model, short_prompt),
            lambda cache: decode_steps(model, cache, steps, args.device),
        ),
        "generation": (lambda: None, lambda _: [timed(args.device, greedy_generate, model, short_prompt, new_tokens)]),
    }
    results = {}
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


ATTENTION_CALLS_PER_RUN = 20
"""Calls per timed run of the attention alone (one call is tens of microseconds)."""


def bench_decode_step_attention(model, args) -> dict:
    """
    The attention of one decode step alone, with the model's heads: consistent mode's function against
    `scaled_dot_product_attention` (what normal mode runs), and the operations of each (views aside).
    """
    results = {}
    for key_length in ATTENTION_CONTEXTS:
        functions = decode_step_attention(model, key_length, args.device)
        cases = {
            name: (contextlib.nullcontext, lambda: None, _repeat_timed(function, args.device))
            for name, function in functions.items()
        }
        timings = side_by_side(cases, args.repeats, args.warmup, args.device)
        results[key_length] = {
            "timings": timings,
            "ratio": ratio(timings["consistent"], timings["sdpa"]),
            "operations": {name: count_operations(function).operations for name, function in functions.items()},
        }
    return results


def _repeat_timed(function, device: str):
    def run(_):
        return [timed(device, lambda: [function() for _ in range(ATTENTION_CALLS_PER_RUN)]) / ATTENTION_CALLS_PER_RUN]

    return run


def bench_switch_cost(model, args) -> list[dict]:
    """`switch_step_at` each prefix length: a model switching there, with the same weights."""
    return [
        switch_step_at(switching_at(model, prefix_length, args), prefix_length, args)
        for prefix_length in args.prefix_lengths
    ]


def switching_at(model, switch_point: int, args):
    """`model` (by reference) if it switches at `switch_point`, otherwise a model with its weights that does."""
    if model.config.original_max_position_embeddings == switch_point:
        return model
    switching_model = build_model(args.model, switch_point, 2 * max(args.prefix_lengths), args.device, args.attention)
    switching_model.load_state_dict(model.state_dict())
    return switching_model


def bench_continuous_batching(model, args) -> dict:
    """
    `generate_batch` throughput (generated tokens per second), patched / unpatched, on two mixed workloads of 8
    requests: none reaching the switch, and half crossing it while decoding (each prefilled again, patched); and the
    cost of that prefill: one crossing request, patched minus unpatched, against a plain prefill of its length.
    """
    if not protects_continuous_batching(transformers.__version__):
        return {"skipped": f"the patches protect continuous batching from transformers {CONTINUOUS_BATCHING_FROM}"}
    switch, new_tokens = args.switch_point, args.switch_point // 16
    workloads = {
        "no crossing": [switch // 16 * k for k in range(1, 9)],
        "half crossing": [switch - new_tokens // 2] * 4 + [switch // 8 * k for k in range(1, 5)],
    }
    results = {
        name: batch_throughput(model, request_prompts(model, lengths), new_tokens, args)
        for name, lengths in workloads.items()
    }
    results["re-prefill"] = reprefill_cost(model, request_prompts(model, [switch - 4])[0], args)
    return results


def request_prompts(model, lengths: list[int]) -> list[list[int]]:
    vocab_size = model.config.vocab_size
    return [
        random_tokens(length, vocab_size=vocab_size, seed=index)[0].tolist() for index, length in enumerate(lengths)
    ]


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


def batch_throughput(model, prompts: list[list[int]], new_tokens: int, args) -> dict:
    """`generate_batch` of `prompts`, `new_tokens` each: generated tokens per second, patched / unpatched."""

    def run(_):
        return [timed(args.device, continuous_batch, model, prompts, new_tokens)]

    timings = side_by_side(patched_and_unpatched(run), args.repeats, args.warmup, args.device)
    generated = new_tokens * len(prompts)
    return {
        "timings": timings,
        "tokens_per_second": {name: 1e3 * generated / timing["median_ms"] for name, timing in timings.items()},
        "throughput patched / unpatched": ratio(timings["unpatched"], timings["patched"]),
    }


def reprefill_cost(model, crossing: list[int], args) -> dict:
    """A request that crosses the switch at its 5th new token (8 new tokens): what the patches' re-prefill of it
    costs (patched minus unpatched), against a plain prefill of its length through `generate_batch`."""

    def crossing_run(_):
        return [timed(args.device, continuous_batch, model, [crossing], 8)]

    def prefill(_):
        # What the re-prefill computes, through `generate_batch` as well: a request of the crossing one's length at
        # the switch (prompt and generated tokens), prefilled, one token generated
        return [timed(args.device, continuous_batch, model, [crossing + [5] * 5], 1)]

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
    return {
        "timings": timings,
        "extra_ms": extra_ms,
        "extra / plain prefill": extra_ms / timings["plain prefill"]["median_ms"],
    }


def format_timing(timing: dict) -> str:
    digits = 3 if timing["median_ms"] < 1 else 2
    return f"{timing['median_ms']:.{digits}f} ms ({timing['min_ms']:.{digits}f}-{timing['max_ms']:.{digits}f})"


# Rows of the cost table: one function per section of `SECTIONS`, each `(measured) -> list[Row]`


@dataclass(frozen=True)
class Row:
    """A line of the cost table: `measured / against`, two medians taken in the same run. Its target is the
    section's for `figure`, if it has one."""

    figure: str
    label: str
    measured: dict
    against: dict
    ratio: float


def decode_step_rows(decode: dict) -> list[Row]:
    timings = decode["timings"]
    return [
        Row("ratio", "decode step, patched / unpatched", timings["patched"], timings["unpatched"], decode["ratio"])
    ]


def switch_step_rows(switch: dict) -> list[Row]:
    timings = switch["timings"]
    return [
        Row("recompute / prefill", "switch step (recompute) / plain prefill", timings["recompute"],
            timings["plain prefill"], switch["recompute / prefill"]),
        Row("rerotate / recompute", "switch step, rerotate / recompute", timings["rerotate"], timings["recompute"],
            switch["rerotate / recompute"]),
    ]  # fmt: skip


def generate_rows(generate: dict) -> list[Row]:
    label = f"generate() across the switch, patched / unpatched ({generate['new_tokens']} tokens)"
    timings = generate["timings"]
    return [Row("ratio", label, timings["patched"], timings["unpatched"], generate["ratio"])]


def batch_rows(batch: dict) -> list[Row]:
    label = (
        f"batch of {batch['batch_size']} crossing at {batch['switch_point']} over {batch['steps']} steps: "
        "crossing rows only / whole batch"
    )
    timings = batch["timings"]
    return [Row("ratio", label, timings["crossing rows only"], timings["whole batch"], batch["ratio"])]


def consistent_rows(consistent: dict) -> list[Row]:
    return [
        Row(name, f"consistent / normal: {name}", measured["timings"]["consistent"], measured["timings"]["normal"],
            measured["ratio"])
        for name, measured in consistent.items()
        if "timings" in measured
    ] + [
        Row(f"attention, {key_length} keys", f"consistent / SDPA: decode-step attention alone, {key_length} keys",
            measured["timings"]["consistent"], measured["timings"]["sdpa"], measured["ratio"])
        for key_length, measured in consistent["decode-step attention"].items()
    ]  # fmt: skip


def continuous_batching_rows(measured: dict) -> list[Row]:
    rows = [
        Row(name, f"generate_batch() throughput, {name}: patched / unpatched", workload["timings"]["patched"],
            workload["timings"]["unpatched"], workload["throughput patched / unpatched"])
        for name, workload in measured.items()
        if "throughput patched / unpatched" in workload
    ]  # fmt: skip
    reprefill = measured["re-prefill"]
    patched_request, unpatched_request = (
        reprefill["timings"][f"crossing request, {side}"] for side in ("patched", "unpatched")
    )
    prefill = reprefill["timings"]["plain prefill"]
    return rows + [
        Row("crossing request", "one crossing request, patched / unpatched", patched_request, unpatched_request,
            ratio(patched_request, unpatched_request)),
        Row("re-prefill", f"its re-prefill ({reprefill['extra_ms']:.0f} ms more) / a plain prefill of its length",
            prefill, prefill, reprefill["extra / plain prefill"]),
    ]  # fmt: skip


# What each section prints after the cost table, and the switch cost's plot


def print_generate_details(generate: dict) -> None:
    print(f"\ngenerate() tokens per second: {generate['tokens_per_second']}")


def print_batch_details(batch: dict) -> None:
    difference = batch["max_abs_logit_difference"]
    print(f"\nbatch: max |Δlogit| between the two strategies at the last step: {difference:.2e}")


def print_consistent_details(consistent: dict) -> None:
    """What dominates a decode step in each mode, and the operations of a decode step at a 4k context."""
    print_decode_step_profile(consistent["decode step profile"])
    attention = consistent["decode-step attention"]
    print_attention_operations({key_length: measured["operations"] for key_length, measured in attention.items()})
    print_decode_step_operations(consistent["operations per decode step"])


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


def print_continuous_batching_details(measured: dict) -> None:
    print()
    for name, workload in measured.items():
        if "tokens_per_second" in workload:
            print(f"generate_batch() tokens per second, {name}: {workload['tokens_per_second']}")


def plot_switch_cost(path: Path, rows: list[dict], results: dict) -> bool:
    """The switch cost's table as a PNG at `path`; `False` (and nothing written) without matplotlib."""
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
    axes.set_title(f"Cost of the longrope switch, {results['model']} {results['dtype']} on {results['device']}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


@dataclass(frozen=True)
class Section:
    """
    A section of the benchmark. `name` is its key in `bench.json` and its choice of `--sections`; `measure(model,
    args)` returns what `bench.json` holds there (or `{"skipped": why}`); `rows(measured)` are its lines of the cost
    table, each against the target `targets` holds for its figure; `details(measured)` prints what follows that
    table; `plot(path, measured, results)` draws `<name>.png`.
    """

    name: str
    measures: str
    measure: Callable[..., dict | list]
    rows: Callable[..., list[Row]] | None = None
    targets: dict[str, str] = field(default_factory=dict)
    details: Callable[..., None] | None = None
    plot: Callable[..., bool] | None = None


SECTIONS = (
    Section(
        "decode_step",
        "an ordinary decode step, a quarter of the switch point in: patched / unpatched",
        bench_decode_step,
        rows=decode_step_rows,
        targets={"ratio": "≤ 1.01"},
    ),
    Section(
        "switch_step",
        "the step crossing the switch, recompute (against a plain prefill of the same length: its physical limit) "
        "and rerotate",
        bench_switch_step,
        rows=switch_step_rows,
        targets={"recompute / prefill": "≤ 1.10"},
    ),
    Section(
        "generate",
        "generate() across the switch: patched / unpatched, and tokens per second",
        bench_generate,
        rows=generate_rows,
        details=print_generate_details,
    ),
    Section(
        "batch",
        "a left-padded batch of 8 rows crossing at 8 different steps: recomputing the crossing rows only against "
        "the whole batch whenever a row crosses",
        bench_batch,
        rows=batch_rows,
        details=print_batch_details,
    ),
    Section(
        "consistent",
        "consistent=True against normal mode: prefill, decode step, generation; the decode-step attention alone; "
        "what dominates a decode step and its operations at a 4k context (scripts/profile_decoding.py)",
        bench_consistent,
        rows=consistent_rows,
        # Issue 16's bounds on consistent mode's cost, on a CPU
        targets={"decode step": "≤ 1.20", "generation": "≤ 1.30"},
        details=print_consistent_details,
    ),
    Section(
        "switch_cost",
        "the switch step at several prefix lengths (a model switching at each, same weights): a table and a PNG",
        bench_switch_cost,
        details=print_switch_cost,
        plot=plot_switch_cost,
    ),
    Section(
        "continuous_batching",
        "generate_batch() throughput, patched / unpatched, below and across the switch; a crossing request's "
        "re-prefill",
        bench_continuous_batching,
        rows=continuous_batching_rows,
        targets={"no crossing": "≥ 0.95"},
        details=print_continuous_batching_details,
    ),
)
"""What `make bench` measures, in the order it measures and reports it."""


def print_report(results: dict) -> None:
    """The run's head, the cost table (every measured section's rows), then each section's details, in table order."""
    measured = [(section, results[section.name]) for section in SECTIONS if section.name in results]
    print_head(results)
    print("| measurement | measured | against | ratio | target |")
    print("|---|---|---|---|---|")
    for section, figures in measured:
        if "skipped" in figures or section.rows is None:
            continue
        for row in section.rows(figures):
            print(
                f"| {row.label} | {format_timing(row.measured)} | {format_timing(row.against)} | {row.ratio:.3f} | "
                f"{section.targets.get(row.figure, '')} |"
            )
    for section, figures in measured:
        if "skipped" in figures:
            print(f"\n{section.name}: skipped ({figures['skipped']})")
        elif section.details is not None:
            section.details(figures)


def print_head(results: dict) -> None:
    gpu = f", {results['machine']['gpu']}" if "gpu" in results["machine"] else ""
    print(
        f"\n{results['model']} ({results['parameters'] / 1e6:.0f}M parameters, {results['dtype']}, "
        f"{results['attention']}, switch after {results['switch_point']} tokens) on {results['device']}: "
        f"{results['machine']['cpu']}, {results['machine']['torch_threads']} threads{gpu}; "
        f"transformers {results['transformers']}, torch {results['torch']}; medians of {results['repeats']} "
        "runs (min-max)\n"
    )


def write_outputs(results: dict, output_dir: Path) -> None:
    """`bench.json`, and the PNG of each measured section that draws one."""
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "bench.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {json_path}")
    for section in SECTIONS:
        if section.plot is None or section.name not in results:
            continue
        path = output_dir / f"{section.name}.png"
        if section.plot(path, results[section.name], results):
            print(f"wrote {path}")
        else:
            print("matplotlib is not installed: no plot")


def parse_args(argv=None):
    """The command line; `--help` lists the sections of `SECTIONS`, and what each measures."""
    sections = "\n".join(f"  {section.name}: {section.measures}" for section in SECTIONS)
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog=f"sections, in the order they are measured:\n{sections}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
        choices=[section.name for section in SECTIONS],
        help="measure only these (default: all); the tables print what was measured",
    )
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA device")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    args.model = args.model or default_model(args.device)
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
    results = {**describe_run(model, args), "repeats": args.repeats, "warmup": args.warmup}
    for section in SECTIONS:
        if args.sections and section.name not in args.sections:
            continue
        print(f"measuring {section.name}...", flush=True)
        results[section.name] = section.measure(model, args)
    print_report(results)
    write_outputs(results, args.output_dir)


if __name__ == "__main__":
    main()
