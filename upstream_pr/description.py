"""The pull request's description: the problem, what changes, the tests, and the figures our own tools measured."""

import csv
from pathlib import Path

from .plan import make_plan, model_coverage, read_release
from .pr_tests import CONTINUOUS_BATCHING_TESTS, pr_test_modules


def _strategy_figures(figures_dir: Path) -> list[str]:
    """The strategy comparison of `scripts/compare_strategies.py`, summarised, if it has been run."""
    path = figures_dir / "strategies_per_step.csv"
    if not path.is_file():
        return [f"(Run `make compare-strategies` to measure them; no `{path}` here.)"]
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    lines = [
        "| strategy | max \\|Δlogit\\| before the switch | max \\|Δlogit\\| after |",
        "|---|---|---|",
    ]
    for strategy in dict.fromkeys(row["strategy"] for row in rows):
        before = [
            float(row["max_abs_logit_diff"])
            for row in rows
            if row["strategy"] == strategy and row["after_switch"] == "False"
        ]
        after = [
            float(row["max_abs_logit_diff"])
            for row in rows
            if row["strategy"] == strategy and row["after_switch"] == "True"
        ]
        lines.append(f"| {strategy} | {max(before):.1e} | {max(after):.1e} |")
    return lines


def _summary(release, covered: dict[str, str], scope: str, changed_files: int) -> list[str]:
    """What a maintainer reads first: the bug, the fix, its reach, and how it is tested, in a minute."""
    models = ", ".join(f"{prefix}" for prefix in covered.values())
    reach = (
        f"the Phi-3 family only ({models}): the smallest change that fixes Phi-3, Phi-3.5 and Phi-4-mini; the same "
        "decorators extend to every model with the standard rotary embedding in a follow-up"
        if scope != "all"
        else f"{len(covered)} models ({models})"
    )
    return [
        "## Summary",
        "",
        "- **Bug**: with a longrope or dynamic NTK config, the keys cached before the sequence crosses "
        "`original_max_position_embeddings` (or `max_position_embeddings`) were rotated with other frequencies than "
        "those used after it. Only `generate()` on the Phi models drops the cache; hand-written loops, static caches, "
        "assisted decoding, left-padded batches and every other model decode with stale keys (max |Δlogit| > 1 on a "
        "tiny Phi-3).",
        "- **Fix**: the cache records which frequencies its keys were rotated with; a forward pass that needs others "
        "recomputes it in place (longrope default; a policy chooses `warn`, `raise`, `rerotate` or `ignore`). The "
        "longrope choice moves to the device, per row.",
        f"- **Reach**: {reach}; {changed_files} files against transformers {release}, tests included.",
        "- **Tests**: each decoding path across the switch against the forward pass without cache (fp32, 1e-4).",
        "",
    ]


def describe(
    tree: Path,
    figures_dir: Path,
    plans: list | None = None,
    verification_lines: list[str] | None = None,
    scope: str = "all",
) -> str:
    """
    The pull request's description for the transformers source tree `tree`, in Markdown, for the pull request of
    `scope` (see `make_plan`). `plans` is `make_plan(tree, scope)` (made here when not given); `verification_lines`
    come from `VerificationReport.lines`.
    """
    release = read_release(tree)
    plans = plans if plans is not None else make_plan(tree, scope)
    covered, left_out = model_coverage(tree / "src" / "transformers" / "models", release, scope)
    test_files = pr_test_modules(release, scope)
    changes = [f"- `{file_plan.path}`: " + "; ".join(file_plan.describe()) for file_plan in plans]
    left_out_lines = [
        "Models with a standard-looking rotary embedding left as they are (their caches stay stale across a switch, "
        "as today), and why:",
        "",
        *(f"- `{module_name}`: {reason}" for module_name, reason in left_out.items()),
        "",
    ]
    sections = [
        "# Keep the KV cache consistent when RoPE frequencies depend on the sequence length",
        "",
        *_summary(release, covered, scope, len(plans) + len(test_files)),
        "## Problem",
        "",
        "LongRoPE models (Phi-3, Phi-3.5, Phi-4-mini, PhiMoE, Phi-4-multimodal, and any model configured with "
        '`rope_type="longrope"`) rotate with short factors up to `original_max_position_embeddings` tokens and long '
        "factors beyond. When decoding crosses that point, every cached key was rotated with the short factors and is "
        "stale. `Phi3ForCausalLM.prepare_inputs_for_generation` drops the cache so that `generate()` recomputes it, "
        "but hand-written loops, assisted decoding, static caches and left-padded batches stay wrong, and other models "
        'with a longrope config have no recompute at all. Dynamic NTK (`rope_type="dynamic"`) changes its frequencies '
        "at every length beyond `max_position_embeddings`: the same staleness. PhiMoE never switches to its long "
        "factors (its rotary `forward` recomputes the short ones at every call).",
        "",
        "## What changes",
        "",
        "- `modeling_rope_utils.py`: the longrope update is one rule, `max(position_ids) + 1 > "
        "original_max_position_embeddings`, chosen on the device (no host synchronisation, the `inv_freq` buffer "
        "keeps its address); in a left-padded batch each row gets the factors of its own length.",
        "- `rope_cache_utils.py` (new): a record kept on each cache object says which frequencies its keys were "
        "rotated with and what was fed through it. `check_rope_cache` (decoder `forward`) applies a policy when a "
        "forward pass needs other frequencies: `recompute` (default for longrope) recomputes the cache in place, in "
        "the caller's cache object; `warn` (default for dynamic NTK, whose recompute costs a prefill at every step "
        "beyond the limit), `raise`, `rerotate` (approximate) and `ignore` are the others. `split_at_rope_switch` "
        "(causal LM `forward`) splits a chunk whose logits straddle the switch. `check_rope_cache_in_generation` "
        "replaces the cache drop in `generate()` on every path, eagerly, so compiled forward passes never recompute.",
        "",
        f"Files ({len(plans) + len(test_files)} with the tests), against transformers {release}:",
        "",
        *changes,
        "",
        *(left_out_lines if left_out else []),
        "## Tests",
        "",
        *(PR_TEST_DESCRIPTIONS[path] for path in test_files),
        "",
        "## Measured",
        "",
        "Decoding a tiny random Phi-3 token by token across the switch, max |Δlogit| against the forward pass without "
        "cache (`scripts/compare_strategies.py`):",
        "",
        *_strategy_figures(figures_dir),
        "",
    ]
    if verification_lines:
        sections += ["## Verified", "", *verification_lines, ""]
    return "\n".join(sections)


PR_TEST_DESCRIPTIONS = {
    "tests/models/phi3/test_modeling_phi3.py": "- `tests/models/phi3/test_modeling_phi3.py`, `Phi3LongRopeCacheTest`: "
    "hand-written loops (dynamic and static cache, 3-token chunks), `generate()` greedy and prompt lookup, and a "
    "left-padded batch (each row against that row alone) across the switch, against the forward pass without cache "
    "(fp32, tolerance 1e-4; the rounding noise on the tiny model is ~1e-5, a stale cache gives > 1).",
    "tests/models/llama/test_modeling_llama.py": "- `tests/models/llama/test_modeling_llama.py`, "
    "`LlamaSequenceDependentRopeCacheTest`: longrope and dynamic NTK in a hand-written loop, longrope in `generate()`.",
}
"""What each test module the pull request adds checks (see `pr_tests`)."""
PR_TEST_DESCRIPTIONS[CONTINUOUS_BATCHING_TESTS] = (
    f"- `{CONTINUOUS_BATCHING_TESTS}`, `ContinuousBatchingLongRopeTest`: `generate_batch` with requests that cross "
    "the switch, stay short and start long, packed (eager and sdpa, chunked prefill), each against that request "
    "decoded alone without cache."
)
