"""
Compares what engines do with a KV cache at the longrope switch, on a tiny random Phi-3 (no downloads).

A fixed token sequence is decoded token by token through a cache across the switch from short to long factors; at
every step the logits (and each layer's hidden state of the new token) are compared with a forward pass without
cache over the same tokens, the model's own answer. Strategies:

- stale: the factors switch, the cache is kept (upstream transformers in a hand-written loop, SGLang);
- recompute: the cached prefix is recomputed with the long factors (`stale_cache="recompute"`);
- rerotate: the cached keys are rotated to the long factors, no forward pass (`stale_cache="rerotate"`);
- static short / static long: one factor set for every length, chosen up front (llama.cpp by context size, vLLM by
  `max_model_len`): the cache is self-consistent, but the model is not the one that switches.

Prints a table (max |Δlogit| before and after the switch, mean KL(reference || strategy) after it), and writes a CSV
per step, a CSV per layer and, when matplotlib is installed, a PNG.

    python scripts/compare_strategies.py --output-dir out/strategies
"""

import argparse
import csv
import sys
import warnings
from pathlib import Path

import torch


# Run as `python scripts/compare_strategies.py` from the repository root, with or without make: the packages are there
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patches  # noqa: E402
from patches.tiny_models import SWITCH_POINT, new_cache, random_tokens, tiny_phi3_config, tiny_phi3_model  # noqa: E402
from transformers import Phi3ForCausalLM


STRATEGIES = ("stale", "recompute", "rerotate", "static short", "static long")


def static_factor_model(model, factors: str):
    """The same weights with one factor set for every length: `factors` is `"short_factor"` or `"long_factor"`."""
    config = tiny_phi3_config(attn_implementation="eager", num_hidden_layers=model.config.num_hidden_layers)
    rope_parameters = getattr(config, "rope_parameters", None) or config.rope_scaling
    rope_parameters["short_factor"] = rope_parameters["long_factor"] = list(rope_parameters[factors])
    static_model = Phi3ForCausalLM(config).eval()
    static_model.load_state_dict(model.state_dict())
    return static_model


@torch.no_grad()
def no_cache_outputs(model, input_ids):
    """Last-token logits and per-layer hidden states of a forward pass without cache: the reference."""
    outputs = model(input_ids, use_cache=False, output_hidden_states=True)
    return outputs.logits[:, -1].float(), [hidden[:, -1].float() for hidden in outputs.hidden_states]


@torch.no_grad()
def cached_outputs(model, input_ids, prompt_length: int):
    """Feeds `input_ids` through a cache, one token at a time after the prompt; yields each step's outputs."""
    cache = new_cache("dynamic", model.config)
    model(input_ids[:, :prompt_length], past_key_values=cache)
    for position in range(prompt_length, input_ids.shape[1]):
        outputs = model(input_ids[:, position : position + 1], past_key_values=cache, output_hidden_states=True)
        yield position + 1, outputs.logits[:, -1].float(), [hidden[:, -1].float() for hidden in outputs.hidden_states]


def strategy_steps(strategy: str, model, input_ids, prompt_length: int):
    if strategy.startswith("static"):
        static_model = static_factor_model(model, "short_factor" if strategy == "static short" else "long_factor")
        with patches.applied(stale_cache="ignore"):
            yield from cached_outputs(static_model, input_ids, prompt_length)
        return
    policy = {"stale": "warn", "recompute": "recompute", "rerotate": "rerotate"}[strategy]
    with patches.applied(stale_cache=policy), warnings.catch_warnings():
        warnings.simplefilter("ignore", patches.StaleRopeCacheWarning)
        yield from cached_outputs(model, input_ids, prompt_length)


def measure(model, input_ids, prompt_length: int) -> tuple[list[dict], list[dict]]:
    """Rows per step and per layer, for every strategy, against the switching model without cache."""
    with patches.applied():
        references = {
            length: no_cache_outputs(model, input_ids[:, :length])
            for length in range(prompt_length + 1, input_ids.shape[1] + 1)
        }
    step_rows, layer_rows = [], []
    for strategy in STRATEGIES:
        layer_errors = None
        for length, logits, hidden_states in strategy_steps(strategy, model, input_ids, prompt_length):
            reference_logits, reference_hidden_states = references[length]
            kl = torch.nn.functional.kl_div(
                logits.log_softmax(-1), reference_logits.log_softmax(-1), log_target=True, reduction="batchmean"
            )
            step_rows.append(
                {
                    "strategy": strategy,
                    "sequence_length": length,
                    "after_switch": length > SWITCH_POINT,
                    "max_abs_logit_diff": (logits - reference_logits).abs().max().item(),
                    "kl_reference_to_strategy": kl.item(),
                }
            )
            if length > SWITCH_POINT:
                errors = [(h - r).abs().max().item() for h, r in zip(hidden_states, reference_hidden_states)]
                layer_errors = [max(pair) for pair in zip(layer_errors, errors)] if layer_errors else errors
        for layer, error in enumerate(layer_errors):
            layer_rows.append({"strategy": strategy, "layer": layer, "max_abs_hidden_diff": error})
    return step_rows, layer_rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, step_rows: list[dict], layer_rows: list[dict]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (steps_axis, layers_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for strategy in STRATEGIES:
        rows = [row for row in step_rows if row["strategy"] == strategy]
        lengths = [row["sequence_length"] for row in rows]
        steps_axis.plot(lengths, [max(row["max_abs_logit_diff"], 1e-8) for row in rows], marker="o", label=strategy)
        rows = [row for row in layer_rows if row["strategy"] == strategy]
        errors = [max(row["max_abs_hidden_diff"], 1e-8) for row in rows]
        layers_axis.plot([row["layer"] for row in rows], errors, marker="o", label=strategy)
    steps_axis.axvline(SWITCH_POINT + 0.5, color="grey", linestyle="--", linewidth=1)
    steps_axis.set(yscale="log", xlabel="sequence length", ylabel="max |Δlogit| vs no cache", title="per step")
    layers_axis.set(
        yscale="log", xlabel="hidden state (0 = embeddings)", ylabel="max |Δ| after the switch", title="per layer"
    )
    layers_axis.xaxis.get_major_locator().set_params(integer=True)
    steps_axis.legend()
    figure.suptitle(
        f"KV cache strategies at the longrope switch (tiny random Phi-3, fp32, switch after {SWITCH_POINT})"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def main() -> None:
    """Measures every strategy at the switch and writes the table, the CSVs and the PNG (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("out/strategies"), help="where the CSVs and PNG go")
    parser.add_argument("--steps-after-switch", type=int, default=12, help="decoding steps past the switch")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the tiny model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model weights and tokens")
    args = parser.parse_args()

    model = tiny_phi3_model(seed=args.seed, num_hidden_layers=args.layers)
    prompt_length = SWITCH_POINT - 4
    input_ids = random_tokens(SWITCH_POINT + args.steps_after_switch, seed=args.seed)
    step_rows, layer_rows = measure(model, input_ids, prompt_length)

    print(
        f"transformers {patches.status().transformers_version}, tiny random Phi-3 (fp32), switch after {SWITCH_POINT}"
    )
    print("against the forward pass without cache (KL clipped at 0 where rounding makes it slightly negative):\n")
    print("| strategy     | max |Δlogit| before the switch | max |Δlogit| after | mean KL(ref ‖ strategy) after |")
    print("|--------------|-------------------------------|--------------------|-------------------------------|")
    for strategy in STRATEGIES:
        before = [row for row in step_rows if row["strategy"] == strategy and not row["after_switch"]]
        after = [row for row in step_rows if row["strategy"] == strategy and row["after_switch"]]
        max_before = max(row["max_abs_logit_diff"] for row in before)
        max_after = max(row["max_abs_logit_diff"] for row in after)
        mean_kl = max(sum(row["kl_reference_to_strategy"] for row in after) / len(after), 0.0)
        print(f"| {strategy:<12} | {max_before:29.1e} | {max_after:18.1e} | {mean_kl:29.1e} |")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_csv(args.output_dir / "strategies_per_step.csv", step_rows)
    write_csv(args.output_dir / "strategies_per_layer.csv", layer_rows)
    written = ["strategies_per_step.csv", "strategies_per_layer.csv"]
    if plot(args.output_dir / "strategies.png", step_rows, layer_rows):
        written.append("strategies.png")
    else:
        print("\n(matplotlib is not installed: no PNG; `make compare-strategies` installs it)")
    print(f"\nwrote {', '.join(str(args.output_dir / name) for name in written)}")


if __name__ == "__main__":
    main()
