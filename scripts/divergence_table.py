"""
How far cached decoding drifts from the forward pass without cache, layer by layer: the table of the first background
thread (fp32 ~1e-5, fp16 ~0.02, bf16 ~0.14 on Llama-7B logits), reproducible for any model.

For each prompt, the first token is generated greedily; then that token goes through the model twice: as a decode
step after a prefill of the prompt into a cache, and as the last position of one forward pass over prompt + token
without cache. The max |Δ| between the two, for every hidden state (0 = embeddings) and for the logits, is averaged
over the prompts, for each dtype and attention implementation asked for. No switch is involved: the RoPE is fixed,
the difference is rounding (matrix products of other shapes round differently).

    python scripts/divergence_table.py                                   # small random Llama, fp32/fp16/bf16
    python scripts/divergence_table.py --model /path/to/checkpoint --dtypes bf16 --attention sdpa --samples 16
    python scripts/divergence_table.py --model tiny-phi3 --prompts prompts.txt   # prompts need a tokenizer

Prints the table, writes a CSV and, when matplotlib is installed, a PNG (error by layer, one line per dtype).
"""

import argparse
import csv
import sys
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm


# Run as `python scripts/divergence_table.py` from the repository root, with or without make: the packages are there
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patches.reference import first_token_divergence  # noqa: E402
from patches.tiny_models import TINY_DECODER, TRANSFORMERS_VERSION  # noqa: E402
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

DUMMY_MODELS = {
    # The tiny models of the test suite (head dimension 8), with the usual initialisation
    "tiny-llama": (LlamaConfig, LlamaForCausalLM, {**TINY_DECODER, "initializer_range": 0.02}),
    "tiny-phi3": (Phi3Config, Phi3ForCausalLM, {**TINY_DECODER, "initializer_range": 0.02}),
    # Deep and wide enough for the error to grow with depth as on real models (about 30M parameters)
    "small-llama": (
        LlamaConfig,
        LlamaForCausalLM,
        {
            "vocab_size": 1024,
            "hidden_size": 512,
            "intermediate_size": 1376,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
        },
    ),
}
"""Random-weight models by name: `(config class, model class, config arguments)`."""


def load_model(name: str, dtype: torch.dtype, attention: str, device: str):
    """A dummy model by name (random weights, seed 0), or a checkpoint from a local path or the local hub cache."""
    if name in DUMMY_MODELS:
        config_class, model_class, arguments = DUMMY_MODELS[name]
        torch.manual_seed(0)
        model = model_class(config_class(**arguments, attn_implementation=attention))
        return model.to(device=device, dtype=dtype).eval(), None
    try:
        # The dtype argument was `torch_dtype` before 4.56
        dtype_argument = {"dtype" if TRANSFORMERS_VERSION.release >= (4, 56) else "torch_dtype": dtype}
        model = AutoModelForCausalLM.from_pretrained(
            name, attn_implementation=attention, local_files_only=True, **dtype_argument
        )
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except OSError as error:
        raise SystemExit(
            f"error: {name!r} is neither a dummy model ({', '.join(DUMMY_MODELS)}) nor a checkpoint at a local path or "
            f"in the local hub cache (nothing is downloaded): {error}"
        ) from error
    return model.to(device).eval(), tokenizer


def prompts(args, tokenizer, vocab_size: int) -> list[torch.Tensor]:
    """Token ids of each prompt: random tokens (seeded), or the lines of `--prompts` tokenized."""
    if args.prompts is None:
        generator = torch.Generator().manual_seed(0)
        return [
            torch.randint(3, vocab_size, (1, args.prompt_length), generator=generator) for _ in range(args.samples)
        ]
    if tokenizer is None:
        raise SystemExit("error: --prompts needs a checkpoint with a tokenizer; dummy models take random prompts")
    lines = [line.strip() for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [tokenizer(line, return_tensors="pt").input_ids for line in lines[: args.samples]]


def measure(args) -> list[dict]:
    rows = []
    settings = [(dtype, attention) for dtype in args.dtypes for attention in args.attention]
    for dtype_name, attention in settings:
        model, tokenizer = load_model(args.model, DTYPES[dtype_name], attention, args.device)
        samples = prompts(args, tokenizer, model.config.vocab_size)
        per_sample = [
            first_token_divergence(model, prompt)
            for prompt in tqdm(samples, desc=f"{dtype_name} {attention}", leave=False)
        ]
        for index in range(len(per_sample[0])):
            is_logits = index == len(per_sample[0]) - 1
            rows.append(
                {
                    "dtype": dtype_name,
                    "attention": attention,
                    "output": "logits" if is_logits else f"hidden state {index}",
                    "mean_max_abs_diff": sum(errors[index] for errors in per_sample) / len(per_sample),
                    "samples": len(per_sample),
                }
            )
    return rows


def print_table(rows: list[dict]) -> None:
    columns = list(dict.fromkeys((row["dtype"], row["attention"]) for row in rows))
    outputs = list(dict.fromkeys(row["output"] for row in rows))
    values = {(row["dtype"], row["attention"], row["output"]): row["mean_max_abs_diff"] for row in rows}
    header = ["output", *(f"{dtype} {attention}" for dtype, attention in columns)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for output in outputs:
        cells = [f"{values[(dtype, attention, output)]:.2e}" for dtype, attention in columns]
        print(f"| {output} | " + " | ".join(cells) + " |")


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, rows: list[dict], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for dtype, attention in dict.fromkeys((row["dtype"], row["attention"]) for row in rows):
        line = [row for row in rows if row["dtype"] == dtype and row["attention"] == attention]
        axis.plot(
            range(len(line)),
            [max(row["mean_max_abs_diff"], 1e-9) for row in line],
            marker="o",
            label=f"{dtype} {attention}",
        )
        ticks = [row["output"].removeprefix("hidden state ") for row in line]
    axis.set_xticks(range(len(ticks)), ticks)
    axis.set(yscale="log", xlabel="hidden state (0 = embeddings), then logits", ylabel="mean max |Δ|", title=title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--model", default="small-llama", help=f"{', '.join(DUMMY_MODELS)}, or a local checkpoint")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--attention", nargs="+", choices=["eager", "sdpa"], default=["eager"])
    parser.add_argument("--samples", type=int, default=8, help="number of prompts")
    parser.add_argument("--prompt-length", type=int, default=64, help="tokens per random prompt")
    parser.add_argument("--prompts", type=Path, help="a text file, one prompt per line (needs a tokenizer)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-dir", type=Path, default=Path("out/divergence"))
    args = parser.parse_args()
    if args.samples < 1 or args.prompt_length < 1:
        parser.error("--samples and --prompt-length must be at least 1")

    warnings.filterwarnings("ignore")
    rows = measure(args)
    print(f"{args.model}: max |Δ| between cached and no-cache computation of the first generated token, ")
    print(f"mean over {rows[0]['samples']} prompts:\n")
    print_table(rows)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_csv(args.output_dir / "divergence.csv", rows)
    written = [args.output_dir / "divergence.csv"]
    if plot(args.output_dir / "divergence.png", rows, f"cache vs no cache, first generated token ({args.model})"):
        written.append(args.output_dir / "divergence.png")
    print(f"\nwrote {', '.join(map(str, written))}")


if __name__ == "__main__":
    main()
