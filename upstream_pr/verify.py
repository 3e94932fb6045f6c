"""Verification of a pull-request diff: apply it to a copy of a tree, check it as upstream's CI would, run its tests."""

import collections
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .checks import modular_agreement_problems, ruff_config, ruff_problems
from .diff import changed_paths, planned_texts, unified_diff
from .pr_tests import PR_TEST_MODULES


@dataclass
class VerificationReport:
    """What `verify` found. `ok` is true when the diff applied and every check passed."""

    release: str = ""
    changed_files: list[str] = field(default_factory=list)
    apply_error: str = ""
    modular_problems: list[str] = field(default_factory=list)
    new_ruff_findings: list[str] = field(default_factory=list)
    transformers_imported_from: str = ""
    tests_returncode: int | None = None
    tests_summary: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.apply_error
            and not self.modular_problems
            and not self.new_ruff_findings
            and self.tests_returncode == 0
        )

    def lines(self) -> list[str]:
        status = "applies cleanly" if not self.apply_error else f"does NOT apply: {self.apply_error}"
        return [
            f"- `git apply --check` on a transformers {self.release} tree: {status} ({len(self.changed_files)} files)",
            f"- modular and modeling files agree: {'yes' if not self.modular_problems else self.modular_problems}",
            f"- new `ruff check` / `ruff format --check` findings (transformers' settings): "
            f"{len(self.new_ruff_findings)}",
            f"- the added tests, with transformers imported from the patched tree "
            f"(`{self.transformers_imported_from}`): {self.tests_summary}",
        ]


def _run(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)


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


def run_pr_tests(tree: Path, test_paths: list[str]) -> tuple[str, int, str]:
    """
    Runs the pull request's tests (`test_paths`, in `tree`) with its `src/` first on the path (the run-time patches
    are not imported). Returns where `transformers` was imported from, pytest's exit code and its summary line.
    """
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    where = _run([sys.executable, "-c", "import transformers; print(transformers.__file__)"], tree, env)
    imported_from = where.stdout.strip()
    result = _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tree), *test_paths],
        tree,
        env,
    )
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return imported_from, result.returncode, lines[-1] if lines else result.stderr.strip()[-500:]


def verify(tree: Path, workdir: Path, texts: dict | None = None) -> VerificationReport:
    """
    Verifies the pull-request diff for `tree` in a copy of `tree` under `workdir`: it applies, modular and modeling
    files agree, ruff finds nothing new, and the added tests pass against the patched transformers. `texts` are the
    planned files (`planned_texts(tree)`, made here when not given).
    """
    from .plan import read_release

    texts = texts if texts is not None else planned_texts(tree)
    diff = unified_diff(texts)
    report = VerificationReport(release=str(read_release(tree)), changed_files=changed_paths(texts))
    patched = workdir / "patched"
    shutil.copytree(tree, patched, ignore=shutil.ignore_patterns("__pycache__", ".git"))
    report.apply_error = apply_diff(diff, patched)
    if report.apply_error:
        return report
    report.modular_problems = modular_agreement_problems(patched, report.changed_files)
    existing = [path for path in report.changed_files if (tree / path).is_file()]
    config = ruff_config(tree, read_release(tree).major)
    before = collections.Counter(ruff_problems(tree, existing, config))
    after = collections.Counter(ruff_problems(patched, report.changed_files, config))
    report.new_ruff_findings = sorted((after - before).elements())
    report.transformers_imported_from, report.tests_returncode, report.tests_summary = run_pr_tests(
        patched, [path for path in report.changed_files if path in PR_TEST_MODULES]
    )
    return report
