"""The description of each pull request of the series: its text, with the figures measured on the trees before and after it."""

import json
import os
import subprocess
import sys
from pathlib import Path

from packaging.version import Version

from .build import PullRequestFiles
from .verify import PullRequestReport, write_texts


DESCRIPTIONS = Path(__file__).parent / "descriptions"
MEASUREMENTS = {
    "01-generate-longrope-cache.md": Path(__file__).parent / "measure_generation.py",
    "02-decoding-loop-longrope-cache.md": Path(__file__).parent / "measure_decoding_loop.py",
    "03-longrope-factors-per-row.md": Path(__file__).parent / "measure_batched_generation.py",
}
"""The script each description's figures come from, run in the trees before and after the pull request."""


def measure(tree: Path, files: PullRequestFiles, with_tests: bool = False) -> dict[str, str] | None:
    """
    The figures of `files`' description, measured with transformers imported from `tree` (`None` when it quotes
    none). `with_tests` first writes the pull request's tests into `tree` (a tree before it), whose models the
    measurement uses.
    """
    script = MEASUREMENTS.get(files.pull_request.description)
    if script is None:
        return None
    if with_tests:
        write_texts(tree, {path: files.texts[path] for path in files.test_paths})
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    command = [sys.executable, str(script), str(tree), files.test_paths[0]]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{script.name} failed in {tree}:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def figures_table(before: dict[str, str], after: dict[str, str]) -> str:
    lines = ["| model, path | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {before[name]} | {after[name]} |" for name in before]
    return "\n".join(lines)


def files_table(files: PullRequestFiles) -> str:
    lines = ["| file | + | − |", "|---|---|---|"]
    total_added = total_removed = 0
    for path, (before, after) in files.texts.items():
        added, removed = line_counts(before, after)
        total_added, total_removed = total_added + added, total_removed + removed
        lines.append(f"| `{path}` | {added} | {removed} |")
    lines.append(f"| {len(files.texts)} files | {total_added} | {total_removed} |")
    return "\n".join(lines)


def line_counts(before: str | None, after: str) -> tuple[int, int]:
    """Lines added and removed from `before` to `after`, as `git diff --numstat` counts them."""
    import difflib

    added = removed = 0
    for line in difflib.unified_diff((before or "").splitlines(), after.splitlines(), n=0, lineterm=""):
        if line.startswith("+") and not line.startswith("+++"):
            added += 1
        elif line.startswith("-") and not line.startswith("---"):
            removed += 1
    return added, removed


def describe(
    files: PullRequestFiles,
    release: Version,
    report: PullRequestReport | None,
    figures: tuple[dict, dict] | None = None,
) -> str:
    """The description of `files`' pull request, with `report`'s verification and `figures` (before, after)."""
    template = (DESCRIPTIONS / files.pull_request.description).read_text(encoding="utf-8")
    verification = (
        "Verified at its place in the series (`make diff`):\n" + "\n".join(report.lines())
        if report is not None
        else "Not verified: run `make diff` (`scripts/make_pr_diff.py --verify`)."
    )
    if report is not None and report.passing_before:
        verification += (
            "\n\nRegression guards (they pass before this PR, and keep what it removes right):\n"
            + "\n".join(f"- `{name}`" for name in report.passing_before)
        )
    measured = (
        figures_table(*figures)
        if figures is not None
        else "Measured by `make diff` (`scripts/make_pr_diff.py --verify`)."
    )
    return template.format(
        release=release,
        test_path=files.test_paths[0],
        verification=verification,
        measured=measured,
        files=files_table(files),
    )
