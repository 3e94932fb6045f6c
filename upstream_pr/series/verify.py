"""
Verification of each pull request at its place in the series: on the tree as the pull requests before it leave it,
its tests fail (but for its named regression guards); its diff applies with `git apply`; ruff finds nothing new; and
with it applied, its tests pass. transformers is imported from the tree under test, and the run-time patches are not.
"""

import collections
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..checks import ruff_config, ruff_problems
from ..diff import unified_diff
from .build import PullRequestFiles, read_release


TEST_OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR) \S+?::(\S+)")


@dataclass
class PullRequestReport:
    """What `verify_pull_request` found for one pull request; `ok` when everything held."""

    name: str
    changed_files: list[str] = field(default_factory=list)
    failing_before: list[str] = field(default_factory=list)
    passing_before: list[str] = field(default_factory=list)
    unexpected_guards: list[str] = field(default_factory=list)
    apply_error: str = ""
    new_ruff_findings: list[str] = field(default_factory=list)
    transformers_imported_from: str = ""
    tests_returncode: int | None = None
    tests_summary: str = ""

    @property
    def ok(self) -> bool:
        return (
            bool(self.failing_before)
            and not self.unexpected_guards
            and not self.apply_error
            and not self.new_ruff_findings
            and self.tests_returncode == 0
        )

    def lines(self) -> list[str]:
        applied = "applies cleanly" if not self.apply_error else f"does NOT apply: {self.apply_error}"
        return [
            f"- `git apply` on the tree as the pull requests before it leave it: {applied}",
            f"- its tests before it: {len(self.failing_before)} fail, {len(self.passing_before)} pass (the "
            "regression guards)"
            + (f"; passing but not named as guards: {self.unexpected_guards}" if self.unexpected_guards else ""),
            f"- with it: {self.tests_summary} (transformers imported from the tree's `{self.transformers_imported_from}`)",
            f"- new `ruff check` / `ruff format --check` findings (transformers' settings): "
            f"{len(self.new_ruff_findings)}",
        ]


def _run(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)


def write_texts(tree: Path, texts: dict[str, tuple[str | None, str]]) -> None:
    """Writes the `after` text of each file of `texts` into `tree`."""
    for path, (_, after) in texts.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(after, encoding="utf-8")


def apply_diff(diff: str, tree: Path) -> str:
    """Applies `diff` to `tree` with `git apply` (checked first); returns git's complaint, or "" when it applied."""
    diff_path = tree / ".pr.diff"
    diff_path.write_text(diff, encoding="utf-8")
    try:
        for command in (["git", "apply", "--check", diff_path.name], ["git", "apply", diff_path.name]):
            result = _run(command, tree)
            if result.returncode != 0:
                return result.stderr.strip() or f"`{' '.join(command)}` exited with {result.returncode}"
    finally:
        diff_path.unlink()
    return ""


def run_tests(tree: Path, test_ids: list[str]) -> tuple[str, int, str, dict[str, str]]:
    """
    Runs `test_ids` (pytest ids in `tree`) with its `src/` first on the path. Returns where `transformers` was imported from,
    pytest's exit code, its summary line and each test's outcome (`{test id: "PASSED" | "FAILED" | "ERROR"}`).
    """
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    where = _run([sys.executable, "-c", "import transformers; print(transformers.__file__)"], tree, env)
    result = _run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--rootdir", str(tree), *test_ids],
        tree,
        env,
    )
    outcomes = {}
    for line in result.stdout.splitlines():
        if match := TEST_OUTCOME.match(line):
            outcomes[match.group(2)] = match.group(1)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else result.stderr.strip()[-500:]
    imported_from = where.stdout.strip()
    if imported_from.startswith(str(tree)):
        imported_from = str(Path(imported_from).relative_to(tree))
    return imported_from, result.returncode, summary, outcomes


def verify_pull_request(before_tree: Path, files: PullRequestFiles, workdir: Path) -> PullRequestReport:
    """
    Verifies one pull request on `before_tree` (the tree as the pull requests before it leave it), in copies of it
    under `workdir`.
    """
    report = PullRequestReport(name=files.name)
    report.changed_files = [path for path, (before, after) in files.texts.items() if before != after]
    test_texts = {path: files.texts[path] for path in files.test_paths}

    # Its tests on the tree before it
    unpatched = workdir / f"{files.name}-before"
    shutil.copytree(before_tree, unpatched, ignore=shutil.ignore_patterns("__pycache__"))
    write_texts(unpatched, test_texts)
    *_, outcomes = run_tests(unpatched, files.test_ids)
    shutil.rmtree(unpatched)
    report.failing_before = sorted(name for name, outcome in outcomes.items() if outcome != "PASSED")
    report.passing_before = sorted(name for name, outcome in outcomes.items() if outcome == "PASSED")
    guards = files.pull_request.regression_guards
    report.unexpected_guards = [name for name in report.passing_before if not name.startswith(guards)]

    # The diff on the tree before it, and its tests with it
    patched = workdir / f"{files.name}-after"
    shutil.copytree(before_tree, patched, ignore=shutil.ignore_patterns("__pycache__"))
    report.apply_error = apply_diff(unified_diff(files.texts), patched)
    if report.apply_error:
        return report
    existing = [path for path in report.changed_files if (before_tree / path).is_file()]
    config = ruff_config(before_tree, read_release(before_tree).major)
    found_before = collections.Counter(ruff_problems(before_tree, existing, config))
    found_after = collections.Counter(ruff_problems(patched, report.changed_files, config))
    report.new_ruff_findings = sorted((found_after - found_before).elements())
    report.transformers_imported_from, report.tests_returncode, report.tests_summary, _ = run_tests(
        patched, files.test_ids
    )
    return report
