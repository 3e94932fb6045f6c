"""The checks upstream's CI makes of a changed transformers tree that the series verification repeats: ruff."""

import subprocess
import sys
from pathlib import Path


BUNDLED_RUFF_SETTINGS = Path(__file__).parent / "ruff"


def ruff_config(tree: Path, release_major: int) -> Path:
    """
    transformers' ruff settings for `tree`: its own `pyproject.toml` where it has one (a checkout), else those of
    its major release, bundled here (a tree laid out from an installed release has no `pyproject.toml`).
    """
    pyproject = tree / "pyproject.toml"
    if pyproject.is_file() and "[tool.ruff]" in pyproject.read_text(encoding="utf-8"):
        return pyproject
    return BUNDLED_RUFF_SETTINGS / f"transformers-{release_major}.toml"


def _ruff(arguments: list[str], cwd: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *arguments], cwd=cwd, capture_output=True, text=True, check=False
    )
    return [line for line in result.stdout.splitlines() if line.strip()]


def ruff_fixed(text: str, path: str, config: Path, rules: tuple[str, ...]) -> str:
    """`text` (the file `path` of a tree) with ruff's fixes for `rules` applied, with the settings in `config`."""
    settings = ["--config", str(config.resolve()), "--no-cache", "--select", ",".join(rules)]
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--fix-only", "--exit-zero", *settings, "--stdin-filename", path, "-"],
        input=text,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def ruff_problems(tree: Path, paths: list[str], config: Path) -> list[str]:
    """
    `ruff check` and `ruff format --check` findings on `paths` of `tree` with the settings in `config` (see
    `ruff_config`), as `path: CODE message` (without line numbers, so that findings before and after an edit
    compare).
    """
    settings = ["--config", str(config.resolve()), "--no-cache"]
    check = _ruff(["check", "--output-format=concise", *settings, *paths], tree)
    formatting = _ruff(["format", "--check", *settings, *paths], tree)
    findings = []
    for line in check:
        parts = line.split(":", 3)
        if len(parts) == 4 and parts[1].isdigit():
            findings.append(f"{parts[0]}:{parts[3]}")
    findings += [line for line in formatting if line.lower().startswith("would reformat")]
    return sorted(findings)
