"""
Reproduces the stale-cache problem and its fix on tiny random Phi-3 longrope models (no downloads).

For each decoding path that crosses the switch from short to long RoPE factors, prints the max |Δlogit| between
the cached decoding and a forward pass without cache over the same tokens, unpatched and patched.

    python scripts/reproduce.py
"""

import argparse
import sys
import warnings
from pathlib import Path

import torch


# Run as `python scripts/reproduce.py` from the repository root, with or without make: the packages are there
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patches  # noqa: E402
from patches.decoding_paths import decoding_paths  # noqa: E402
from patches.reference import FP32_TOLERANCE  # noqa: E402
from patches.tiny_models import SWITCH_POINT, reset_dynamic_rope, tiny_phi3_model  # noqa: E402
from transformers.utils import logging


def measure_paths(model) -> dict[str, str]:
    """Max |Δlogit| against the no-cache reference for each decoding path (`patches.decoding_paths`, the self-check's
    list), as printable strings: `inf` where tokens differ or the caller's cache was replaced, the error a path
    raises, or why it is not measured."""
    results = {}
    for name, measure in decoding_paths().items():
        if isinstance(measure, str):
            results[name] = "not measured"
            continue
        reset_dynamic_rope(model)
        try:
            results[name] = f"{max(measure(model)):.1e}"
        except Exception as error:  # a path upstream does not support is reported, not hidden
            results[name] = f"error: {type(error).__name__}"
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    # One path passes the cache under its deprecated keyword on purpose
    warnings.filterwarnings("ignore", category=FutureWarning)
    model = tiny_phi3_model()
    model.generation_config.pad_token_id = 0

    patches.revert()
    with torch.no_grad():
        unpatched = measure_paths(model)
        with patches.applied() as status:
            patched = measure_paths(model)

    print(
        f"transformers {status.transformers_version}, tiny random Phi-3 (fp32), longrope switch after {SWITCH_POINT}"
    )
    print(f"max |Δlogit| against a forward pass without cache, every step (tolerance {FP32_TOLERANCE:.0e}):\n")
    width = max(len(name) for name in unpatched)
    value_width = max(len("unpatched"), *(len(value) for value in (*unpatched.values(), *patched.values())))
    print(f"| {'path':<{width}} | {'unpatched':<{value_width}} | {'patched':<{value_width}} |")
    print(f"|{'-' * (width + 2)}|{'-' * (value_width + 2)}|{'-' * (value_width + 2)}|")
    for name in unpatched:
        print(f"| {name:<{width}} | {unpatched[name]:<{value_width}} | {patched[name]:<{value_width}} |")


if __name__ == "__main__":
    main()
