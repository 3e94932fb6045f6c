"""The pull request's description: the problem, what changes, the tests, and the figures our own tools measured."""

import csv
from pathlib import Path

from patches.targets import LEFT_OUT_MODELS

from .plan import make_plan, read_release


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


def describe(
    tree: Path, figures_dir: Path, plans: list | None = None, verification_lines: list[str] | None = None
) -> str:
    """
    The pull request's description for the transformers source tree `tree`, in Markdown. `plans` is `make_plan(tree)`
    (made here when not given); `verification_lines` come from `VerificationReport.lines`.
    """
    release = read_release(tree)
    plans = plans if plans is not None else make_plan(tree)
    changes = []
    for file_plan in plans:
        changes.append(f"- `{file_plan.path}`: " + "; ".join(file_plan.describe()))
    sections = [
        "# Keep the KV cache consistent when RoPE frequencies depend on the sequence length",
        "",
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
        f"Files ({len(plans) + 2} with the tests), against transformers {release}:",
        "",
        *changes,
        "",
        "Models with a standard-looking rotary embedding left as they are (their caches stay stale across a switch, "
        "as today), and why:",
        "",
        *(f"- `{module_name}`: {reason}" for module_name, reason in sorted(LEFT_OUT_MODELS.items())),
        "",
        "## Tests",
        "",
        "- `tests/models/phi3/test_modeling_phi3.py`, `Phi3LongRopeCacheTest`: hand-written loops (dynamic and static "
        "cache, 3-token chunks), `generate()` greedy and prompt lookup, and a left-padded batch (each row against that "
        "row alone) across the switch, against the forward pass without cache (fp32, tolerance 1e-4; the rounding "
        "noise on the tiny model is ~1e-5, a stale cache gives > 1).",
        "- `tests/models/llama/test_modeling_llama.py`, `LlamaSequenceDependentRopeCacheTest`: longrope and dynamic "
        "NTK in a hand-written loop, longrope in `generate()`.",
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
