"""The pull-request diff: a pristine tree from the installed release, the planned edits, and the unified diff."""

import difflib
import shutil
from pathlib import Path

from .plan import FilePlan, make_plan, read_release
from .pr_tests import merge_test_module, pr_test_modules


def build_pristine_tree(destination: Path) -> Path:
    """
    Lays out the installed transformers release in the upstream layout under `destination`: its package as
    `src/transformers/` (byte for byte, without bytecode caches) and an empty `tests/models/`, since the released
    package ships no tests. Works offline.
    """
    import transformers

    package = Path(transformers.__file__).parent
    shutil.copytree(package, destination / "src" / "transformers", ignore=shutil.ignore_patterns("__pycache__"))
    (destination / "tests" / "models").mkdir(parents=True)
    return destination


def planned_texts(
    tree: Path, plans: list[FilePlan] | None = None, scope: str = "all"
) -> dict[str, tuple[str | None, str]]:
    """
    Every file the pull request of `scope` changes in `tree`: `{path: (text before or None for a new file, text
    after)}`, sorted by path. The model code comes from `plans` (`make_plan(tree, scope)` when not given), the tests
    from `pr_tests`, written for the tree's release.
    """
    texts = {}
    for file_plan in plans if plans is not None else make_plan(tree, scope):
        texts[file_plan.path] = _apply(tree, file_plan)
    for relative, module_text in pr_test_modules(read_release(tree), scope).items():
        path = tree / relative
        before = path.read_text(encoding="utf-8") if path.is_file() else None
        texts[relative] = (before, merge_test_module(before, module_text))
    return dict(sorted(texts.items()))


def _apply(tree: Path, file_plan: FilePlan) -> tuple[str | None, str]:
    if file_plan.new_text is not None:
        return None, file_plan.new_text
    before = (tree / file_plan.path).read_text(encoding="utf-8")
    after = before
    for edit in file_plan.edits:
        try:
            after = edit.apply(after)
        except LookupError as error:
            raise LookupError(f"{file_plan.path}: {error}") from error
    return before, after


def unified_diff(texts: dict[str, tuple[str | None, str]]) -> str:
    """A `git apply`-able unified diff of `texts` (see `planned_texts`), the same bytes for the same input."""
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


def changed_paths(texts: dict[str, tuple[str | None, str]]) -> list[str]:
    return [path for path, (before, after) in texts.items() if before != after]
