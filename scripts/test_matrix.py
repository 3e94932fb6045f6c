"""
Runs the test suite against every transformers release the patches support, each in its own environment.

    python scripts/test_matrix.py                      # every release in patches.coverage.TESTED_VERSIONS
    python scripts/test_matrix.py --releases 4.44.2 5.23.0

Each release gets a virtual environment under `.matrix/transformers-<release>/` with that transformers release, its
own dependencies and the test tools. PyTorch is installed once, into `.matrix/torch-<version>/`, and shared by every
environment through a `.pth` file, so the large wheel is neither downloaded nor unpacked once per release. An
environment that is already complete is reused. At the end a release x result table is printed; the exit status is
non-zero if any release failed.
"""

import argparse
import os
import subprocess
import sys
import time
import venv
import xml.etree.ElementTree as ElementTree
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from patches.coverage import TESTED_VERSIONS  # noqa: E402


DEV_REQUIREMENTS = REPO_ROOT / "requirements-dev.txt"
"""The test tools (and accelerate, which the tests use), installed in every environment."""


def run(command: list[str], **kwargs) -> None:
    print("+", " ".join(str(part) for part in command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def shared_torch(matrix_dir: Path, torch_version: str) -> Path:
    """Installs torch (and its own dependencies) once into a folder that every release environment shares."""
    target = matrix_dir / f"torch-{torch_version}"
    marker = target / ".complete"
    if not marker.exists():
        run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), f"torch=={torch_version}"])
        marker.touch()
    return target


def release_environment(matrix_dir: Path, release: str, torch_dir: Path) -> Path:
    """Creates (or reuses) the virtual environment of one transformers release and returns its Python."""
    environment = matrix_dir / f"transformers-{release}"
    python = environment / "bin" / "python"
    marker = environment / ".complete"
    # An environment made with other requirements is made again
    wanted = f"transformers=={release}\n{DEV_REQUIREMENTS.read_text(encoding='utf-8')}"
    if not marker.exists() or marker.read_text(encoding="utf-8") != wanted:
        venv.EnvBuilder(clear=True, with_pip=True).create(environment)
        site_packages = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        # Shares the one torch installation; the release's own packages, installed below, come first on sys.path
        Path(site_packages, "shared-torch.pth").write_text(f"{torch_dir}\n", encoding="utf-8")
        run([str(python), "-m", "pip", "install", "--quiet", f"transformers=={release}", "-r", str(DEV_REQUIREMENTS)])
        marker.write_text(wanted, encoding="utf-8")
    return python


def test_counts(junit_xml: Path) -> dict[str, int]:
    if not junit_xml.exists():
        return {"passed": 0, "failed": 0, "skipped": 0}
    suite = ElementTree.parse(junit_xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, failures, errors, skipped = (int(suite.get(name, 0)) for name in ("tests", "failures", "errors", "skipped"))
    return {"passed": tests - failures - errors - skipped, "failed": failures + errors, "skipped": skipped}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--releases", nargs="+", default=list(TESTED_VERSIONS), help="transformers releases to test")
    parser.add_argument("--torch-version", default="2.13.0", help="torch release shared by every environment")
    parser.add_argument("--matrix-dir", type=Path, default=REPO_ROOT / ".matrix", help="where the environments live")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()

    args.matrix_dir.mkdir(exist_ok=True)
    torch_dir = shared_torch(args.matrix_dir, args.torch_version)
    results = []
    for release in args.releases:
        started = time.monotonic()
        python = release_environment(args.matrix_dir, release, torch_dir)
        install_seconds = time.monotonic() - started
        junit_xml = args.matrix_dir / f"results-{release}.xml"
        junit_xml.unlink(missing_ok=True)
        environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        started = time.monotonic()
        print(f"\n=== transformers {release} ===", flush=True)
        completed = subprocess.run(
            [str(python), "-m", "pytest", "tests", "-q", f"--junitxml={junit_xml}", *args.pytest_args],
            cwd=REPO_ROOT,
            env=environment,
        )
        counts = test_counts(junit_xml)
        results.append((release, completed.returncode, counts, install_seconds, time.monotonic() - started))

    print("\n| transformers | result | passed | failed | skipped | set-up (s) | tests (s) |")
    print("|---|---|---|---|---|---|---|")
    for release, returncode, counts, install_seconds, test_seconds in results:
        result = "ok" if returncode == 0 else f"FAILED (exit {returncode})"
        print(
            f"| {release} | {result} | {counts['passed']} | {counts['failed']} | {counts['skipped']} "
            f"| {install_seconds:.0f} | {test_seconds:.0f} |"
        )
    return 0 if all(returncode == 0 for _, returncode, *_ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
