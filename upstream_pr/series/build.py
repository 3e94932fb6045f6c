"""
The files of each pull request of the series, on a given transformers tree: each one is placed on the tree as the
pull requests before it leave it, and refused by name where upstream changed what it edits.
"""

import ast
from dataclasses import dataclass
from pathlib import Path

from packaging.version import Version

from ..checks import ruff_config, ruff_fixed
from . import SERIES, MemberEdit, PullRequest, member_source, source_hash


SERIES_RELEASE = Version("5.24.0")
"""The release the series is written against: its trees, and checkouts of main (a development version of the next
minor) whose edited members are still those of this release."""


class UnplaceableSeriesError(ValueError):
    """The series cannot be placed on the tree: another release, or a member it edits changed upstream."""


@dataclass
class PullRequestFiles:
    """The files pull request `number` changes: `{path: (text before it or None for a new file, text after it)}`."""

    number: int
    pull_request: PullRequest
    texts: dict[str, tuple[str | None, str]]

    @property
    def name(self) -> str:
        return f"{self.number:02d}-{self.pull_request.slug}"

    @property
    def test_paths(self) -> list[str]:
        tests = self.pull_request.tests
        return [path for path in (tests.checkout_path, tests.new_path) if path in self.texts]

    @property
    def test_ids(self) -> list[str]:
        """The pytest ids of the test classes this pull request adds (its file may hold others: upstream's, or an
        earlier pull request's)."""
        module = ast.parse(self.pull_request.tests.text)
        classes = [node.name for node in module.body if isinstance(node, ast.ClassDef) and node.name.endswith("Test")]
        return [f"{path}::{name}" for path in self.test_paths for name in classes]


def read_release(tree: Path) -> Version:
    """The release of a transformers tree in the upstream layout, from its `__version__`."""
    init = tree / "src" / "transformers" / "__init__.py"
    if not init.is_file():
        raise UnplaceableSeriesError(f"{tree} is no transformers source tree: it has no src/transformers/__init__.py")
    for line in init.read_text(encoding="utf-8").splitlines():
        if line.startswith("__version__"):
            return Version(line.split("=", 1)[1].strip().strip("\"'"))
    raise UnplaceableSeriesError(f"{init} sets no __version__")


def check_release(tree: Path) -> Version:
    """The tree's release, if the series is written for it (`SERIES_RELEASE`, or a development version after it)."""
    release = read_release(tree)
    is_release = release.release[:2] == SERIES_RELEASE.release[:2] and not release.is_devrelease
    is_main = release.is_devrelease and release.release[:2] > SERIES_RELEASE.release[:2]
    if not (is_release or is_main):
        raise UnplaceableSeriesError(
            f"the series is written for transformers {SERIES_RELEASE.major}.{SERIES_RELEASE.minor}.x and checkouts of "
            f"main after it; this tree is {release}. Older releases are served by the run-time patches "
            "(`import patches; patches.apply()`), and need no pull request."
        )
    return release


def _apply_edit(text: str, member_edit: MemberEdit) -> str:
    edit = member_edit.edit
    if member_edit.expected_hash is not None:
        found = member_source(text, member_edit.class_name, edit.method_name)
        if found is None or source_hash(found) != member_edit.expected_hash:
            state = "is not defined" if found is None else f"differs (sha256 {source_hash(found)[:12]})"
            raise UnplaceableSeriesError(
                f"{member_edit.path}: {member_edit.member} {state}; the series was written against its "
                f"{SERIES_RELEASE} source (sha256 {member_edit.expected_hash[:12]}). Port the change in "
                "modeling_overrides/ to the new code and update the hash in upstream_pr/series/__init__.py."
            )
    try:
        return edit.apply(text)
    except LookupError as error:
        raise UnplaceableSeriesError(f"{member_edit.path}: {error}") from error


def _read(tree: Path, overlay: dict[str, str], path: str) -> str | None:
    if path in overlay:
        return overlay[path]
    return (tree / path).read_text(encoding="utf-8") if (tree / path).is_file() else None


def series_files(tree: Path) -> list[PullRequestFiles]:
    """
    Every pull request of the series on `tree`, in order, each made on the tree as the ones before it leave it.
    Raises `UnplaceableSeriesError` (nothing is made) when the tree is not one the series is written for.
    """
    release = check_release(tree)
    config = ruff_config(tree, release.major)
    overlay = {}
    made = []
    for number, pull_request in enumerate(SERIES, start=1):
        texts = {}
        for member_edit in pull_request.edits:
            before = _read(tree, overlay, member_edit.path)
            if before is None:
                raise UnplaceableSeriesError(f"{member_edit.path} does not exist in {tree}")
            texts.setdefault(member_edit.path, (before, before))
            overlay[member_edit.path] = _apply_edit(overlay.get(member_edit.path, before), member_edit)
        for path, (before, _) in texts.items():
            # The imports its edits left unused (a removed method's) go, and the import blocks they touched are
            # sorted, as ruff fixes them: upstream's files have no such finding of their own, so the fixes touch only
            # what the pull request changed
            overlay[path] = ruff_fixed(overlay[path], path, config, rules=("F401", "I001"))
            texts[path] = (before, overlay[path])
        tests = pull_request.tests
        test_path = tests.checkout_path if _read(tree, overlay, tests.checkout_path) is not None else tests.new_path
        if test_path == tests.new_path and (tree / tests.new_path).is_file():
            raise UnplaceableSeriesError(f"{tests.new_path} exists already in {tree}: the tests would replace it")
        # Upstream's file, or the one an earlier pull request of the series made
        existing = _read(tree, overlay, test_path)
        overlay[test_path] = merge_test_module(existing, _imports_where_tests_went(tests.text, made))
        texts[test_path] = (existing, overlay[test_path])
        made.append(PullRequestFiles(number, pull_request, dict(sorted(texts.items()))))
    return made


def _test_module_name(path: str) -> str:
    """`tests/generation/test_utils.py` -> `generation.test_utils`, as the tests' relative imports name it."""
    return path.removeprefix("tests/").removesuffix(".py").replace("/", ".")


def _imports_where_tests_went(module_text: str, made: list[PullRequestFiles]) -> str:
    """
    `module_text` with its imports from an earlier pull request's tests (written as from upstream's file) pointed at
    the file those tests went to: upstream's, or the new file of a tree without upstream's tests.
    """
    for files in made:
        tests = files.pull_request.tests
        if tests.new_path in files.test_paths:
            old, new = _test_module_name(tests.checkout_path), _test_module_name(tests.new_path)
            module_text = module_text.replace(f".{old} import ", f".{new} import ")
    return module_text


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
