"""
Imports a test file of a transformers tree as its package's module, so that its relative imports (an earlier pull
request's tester) resolve: what the measurement scripts next to this file read their models from.
"""

import importlib
import sys
from types import ModuleType


def import_test_module(tree: str, test_path: str) -> ModuleType:
    """`<tree>/<test_path>` (a path under `tests/`) imported as `tests.<...>`, with `tree` first on `sys.path`."""
    sys.path.insert(0, tree)
    return importlib.import_module(test_path.removesuffix(".py").replace("/", "."))
