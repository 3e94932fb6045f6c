"""
The tests the pull request adds, as modules in upstream's test layout, written against upstream's own test utilities
(`transformers.testing_utils`) and the release's public API. They are not collected here: they import
`transformers.rope_cache_utils`, which exists only in a patched transformers tree.
"""

import ast
from pathlib import Path

from packaging.version import Version

from patches.coverage import CONTINUOUS_BATCHING_FROM, pull_request_models


_HERE = Path(__file__).parent

CONTINUOUS_BATCHING_TESTS = "tests/generation/test_continuous_batching.py"
"""Where the continuous-batching tests go: with the whole pull request, from `CONTINUOUS_BATCHING_FROM`."""

PR_TEST_MODULES = {
    "tests/models/phi3/test_modeling_phi3.py": (_HERE / "phi3.py").read_text(encoding="utf-8"),
    "tests/models/llama/test_modeling_llama.py": (_HERE / "llama.py").read_text(encoding="utf-8"),
    CONTINUOUS_BATCHING_TESTS: (_HERE / "continuous_batching.py").read_text(encoding="utf-8"),
}
"""Upstream test file -> the module of tests the pull request adds to it, written for the current cache API."""

SKIP_WITHOUT_LLAMA_LONGROPE = (
    '@unittest.skip(reason="this release\'s longrope init gives Llama the long factors at every length: no switch")'
)

OLDER_API = (
    # The cache is passed as `past_key_values`, and model outputs hold it under that name
    ("5.24", None, ", cache=cache)", ", past_key_values=cache)"),
    ("5.24", "tests/models/phi3/test_modeling_phi3.py", "outputs.cache,", "outputs.past_key_values,"),
    # `DynamicCache` takes no config, `StaticCache` a batch size
    ("4.56", None, "DynamicCache(config=model.config)", "DynamicCache()"),
    (
        "4.56",
        None,
        "StaticCache(config=model.config, max_cache_len=",
        "StaticCache(config=model.config, max_batch_size=1, max_cache_len=",
    ),
    (
        "4.45",
        None,
        "StaticCache(config=model.config, max_batch_size=1, max_cache_len=input_ids.shape[1])",
        'StaticCache(config=model.config, max_batch_size=1, max_cache_len=input_ids.shape[1], device="cpu")',
    ),
    # 4.44's longrope init gives Llama the long factors at every length: there is no switch to test
    (
        "4.45",
        "tests/models/llama/test_modeling_llama.py",
        '@parameterized.expand([("longrope",), ("dynamic",)])',
        '@parameterized.expand([("dynamic",)])',
    ),
    *(
        (
            "4.45",
            "tests/models/llama/test_modeling_llama.py",
            f"\n    def {test}(",
            f"\n    {SKIP_WITHOUT_LLAMA_LONGROPE}\n    def {test}(",
        )
        for test in ("test_longrope_switches_after_original_max_position_embeddings", "test_generate_with_longrope")
    ),
    # 4.44's assisted decoding returns `output_logits` that do not line up with its tokens: greedy decoding only
    (
        "4.45",
        "tests/models/phi3/test_modeling_phi3.py",
        '@parameterized.expand([("greedy", {}), ("prompt_lookup", {"prompt_lookup_num_tokens": 3})])',
        '@parameterized.expand([("greedy", {})])',
    ),
    # Phi-3's attention layers own their rotary embeddings
    (
        "4.48",
        "tests/models/phi3/test_modeling_phi3.py",
        "self.get_model().model.rotary_emb",
        "self.get_model().model.layers[0].self_attn.rotary_emb",
    ),
)
"""How the modules read in releases before the first one given: `(release, file or None for all, current, older)`."""


def pr_test_modules(release: Version, scope: str = "all") -> dict[str, str]:
    """`PR_TEST_MODULES` of the models in `scope` (see `patches.coverage.pull_request_models`), as written for
    `release`'s public API (see `OLDER_API`)."""
    in_scope = {f"tests/models/{name}/test_modeling_{name}.py" for name in pull_request_models(scope)}
    if scope == "all" and release.release[:2] >= tuple(int(part) for part in CONTINUOUS_BATCHING_FROM.split(".")):
        in_scope.add(CONTINUOUS_BATCHING_TESTS)
    modules = {path: text for path, text in PR_TEST_MODULES.items() if path in in_scope}
    for since, only_in, current, older in OLDER_API:
        if release >= Version(since):
            continue
        targets = [path for path in modules if only_in in (None, path) and current in modules[path]]
        if not targets and (only_in is None or only_in in modules):
            # A module changed and the rewrite no longer applies: fail loudly rather than test the wrong API
            raise LookupError(f"{current!r} is in no test module any more, to rewrite for {release}")
        for path in targets:
            modules[path] = modules[path].replace(current, older)
    return modules


def merge_test_module(existing: str | None, module_text: str) -> str:
    """
    `module_text` merged into an existing upstream test file: its imports that the file lacks go after the file's
    last top-level import, its classes at the end. Without an existing file, the module itself.
    """
    if existing is None:
        return module_text
    module = ast.parse(module_text)
    lines = module_text.splitlines(keepends=True)
    existing_lines = existing.splitlines(keepends=True)
    existing_tree = ast.parse(existing)
    first_class = next(node for node in module.body if isinstance(node, ast.ClassDef))
    header = module.body[: module.body.index(first_class)]
    new_imports = [
        "".join(lines[node.lineno - 1 : node.end_lineno])
        for node in header
        if "".join(lines[node.lineno - 1 : node.end_lineno]) not in existing
    ]
    last_import = max(
        (node.end_lineno for node in existing_tree.body if isinstance(node, (ast.Import, ast.ImportFrom, ast.If))),
        default=0,
    )
    start = min([first_class.lineno, *(decorator.lineno for decorator in first_class.decorator_list)]) - 1
    body = "".join(lines[start:])
    merged = [*existing_lines[:last_import], *new_imports, *existing_lines[last_import:]]
    return "".join(merged).rstrip("\n") + "\n\n\n" + body
