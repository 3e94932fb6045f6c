"""A pristine tree from the installed release, and the unified diff of planned file texts."""

import difflib
import shutil
from pathlib import Path


def build_pristine_tree(destination: Path, test_files: tuple[str, ...] = ()) -> Path:
    """
    Lays out the installed transformers release in the upstream layout under `destination`: its package as
    `src/transformers/` (byte for byte, without bytecode caches) and, since the released package ships no tests,
    the test packages of `test_files` (paths under `tests/`) without their tests: the empty `__init__.py` files they
    have upstream, which let a test import another's names (as model tests import from
    `tests/generation/test_utils.py`). Works offline.
    """
    import transformers

    package = Path(transformers.__file__).parent
    shutil.copytree(package, destination / "src" / "transformers", ignore=shutil.ignore_patterns("__pycache__"))
    (destination / "tests" / "models").mkdir(parents=True)
    for test_file in test_files:
        for package in Path(test_file).parents[:-1]:
            (destination / package).mkdir(parents=True, exist_ok=True)
            (destination / package / "__init__.py").touch()
    return destination


def unified_diff(texts: dict[str, tuple[str | None, str]]) -> str:
    """A `git apply`-able unified diff of `texts` (`{path: (text before or None for a new file, text after)}`), the same bytes for the same input."""
    chunks = []
    for path, (before, after) in texts.items():
        if before == after:
            continue
        header = [f"diff --git a/{path} b/{path}\n"]
        if before is None:
            header.append("new file mode 100644\n")
        chunks += header
        chunks += difflib.unified_diff(
            (before or "").splitlines(keepends=True),
            after.splitlines(keepends=True),
            fromfile="/dev/null" if before is None else f"a/{path}",
            tofile=f"b/{path}",
        )
    return "".join(chunks)
