"""
The random-weight longrope Phi-3 models that `scripts/benchmark.py` times and `scripts/profile_decoding.py` profiles,
and the description of a run both write at the head of their JSON. Not a script: the two import it.
"""

import platform

import torch

import transformers
from patches.tiny_models import (
    PHI3_MINI_128K_SHAPE,
    PHI3_MINI_SWITCH_POINT,
    SWITCH_POINT,
    TINY_DECODER,
    longrope_factor_profile,
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


def default_model(device: str) -> str:
    return "phi3-mini" if device.startswith("cuda") else "small-phi3"


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


def describe_run(model, args) -> dict:
    """What was measured, on what: the head of `bench.json` (and of `profile_decoding.py`'s `profile.json`)."""
    return {
        "model": args.model,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "dtype": BENCH_MODELS[args.model]["dtype"],
        "attention": args.attention,
        "switch_point": args.switch_point,
        "device": args.device,
        "machine": machine(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
