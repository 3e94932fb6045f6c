"""
The tests the pull request adds, as modules in upstream's test layout, written against upstream's own test utilities
(`transformers.testing_utils`) and the release's public API. They are not collected here: they import
`transformers.rope_cache_utils`, which exists only in a patched transformers tree.
"""

import ast
from pathlib import Path

from packaging.version import Version


_HERE = Path(__file__).parent

PR_TEST_MODULES = {
    "tests/models/phi3/test_modeling_phi3.py": (_HERE / "phi3.py").read_text(encoding="utf-8"),
    "tests/models/llama/test_modeling_llama.py": (_HERE / "llama.py").read_text(encoding="utf-8"),
}
"""Upstream test file -> the module of tests the pull request adds to it, written for the current cache API."""

CACHE_API_BEFORE_4_56 = (
    ("DynamicCache(config=model.config)", "DynamicCache()"),
    (
        "StaticCache(config=model.config, max_cache_len=",
        "StaticCache(config=model.config, max_batch_size=1, max_cache_len=",
    ),
)
"""How the modules' caches are built before 4.56: `DynamicCache` takes no config, `StaticCache` a batch size."""


def pr_test_modules(release: Version) -> dict[str, str]:
    """`PR_TEST_MODULES` as written for `release`'s public API."""
    if release >= Version("4.56"):
        return dict(PR_TEST_MODULES)
    modules = {}
    for path, text in PR_TEST_MODULES.items():
        for current, older in CACHE_API_BEFORE_4_56:
            text = text.replace(current, older)
        modules[path] = text
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
