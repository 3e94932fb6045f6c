"""
Runs the test suite against every transformers release the patches support, each in its own environment.

    python scripts/test_matrix.py                      # every release in patches.coverage.TESTED_VERSIONS
    python scripts/test_matrix.py --releases 4.44.2 5.23.0
    python scripts/test_matrix.py --self-check         # `python -m patches check` on every release the range admits

Each release gets a virtual environment under `.matrix/transformers-<release>/` with that transformers release, its
own dependencies and the test tools. PyTorch is installed once, into `.matrix/torch-<version>/`, and shared by every
environment through a `.pth` file, so the large wheel is neither downloaded nor unpacked once per release. An
environment that is already complete is reused. At the end a release x result table is printed; the exit status is
non-zero if any release failed. With `--self-check`, the environments (`.matrix/check-<release>/`) hold transformers
alone, and each runs the self-check instead of the suite: the proof for the releases of
`patches.coverage.SELF_CHECKED_RELEASES` that the suite does not run on.
"""

import argparse
import os
import subprocess
import sys
import time
import venv
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from patches.coverage import SELF_CHECKED_RELEASES, TESTED_VERSIONS  # noqa: E402


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


def release_environment(
    matrix_dir: Path, release: str, torch_dir: Path, with_test_tools: bool = True
) -> tuple[Path, str]:
    """Creates (or reuses) the virtual environment of one transformers release; returns its Python and the release."""
    environment = matrix_dir / (f"transformers-{release}" if with_test_tools else f"check-{release}")
    python = environment / "bin" / "python"
    marker = environment / ".complete"
    requirements = ["-r", str(DEV_REQUIREMENTS)] if with_test_tools else []
    # An environment made with other requirements is made again
    wanted = f"transformers=={release}\n{DEV_REQUIREMENTS.read_text(encoding='utf-8') if with_test_tools else ''}"
    if not marker.exists() or marker.read_text(encoding="utf-8") != wanted:
        venv.EnvBuilder(clear=True, with_pip=with_test_tools).create(environment)
        site_packages = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        # Shares the one torch installation; the release's own packages, installed below, come first on sys.path
        Path(site_packages, "shared-torch.pth").write_text(f"{torch_dir}\n", encoding="utf-8")
        if with_test_tools:
            # pip, which sees the shared torch through the `.pth` file: accelerate, among the test tools, needs torch
            run([str(python), "-m", "pip", "install", "--quiet", f"transformers=={release}", *requirements])
        else:
            # transformers alone needs no torch, so uv can install it: from its cache in about 2 s, where pip takes
            # 20 to 50 s (the 33 self-check environments took half of CI's time with pip)
            run(
                [
                    sys.executable,
                    "-m",
                    "uv",
                    "pip",
                    "install",
                    "--quiet",
                    "--python",
                    str(python),
                    f"transformers=={release}",
                ]
            )
        marker.write_text(wanted, encoding="utf-8")
    return python, release


def test_counts(junit_xml: Path) -> dict[str, int]:
    if not junit_xml.exists():
        return {"passed": 0, "failed": 0, "skipped": 0}
    suite = ElementTree.parse(junit_xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests, failures, errors, skipped = (int(suite.get(name, 0)) for name in ("tests", "failures", "errors", "skipped"))
    return {"passed": tests - failures - errors - skipped, "failed": failures + errors, "skipped": skipped}


def run_suite(python: Path, release: str, matrix_dir: Path, pytest_args: list[str]) -> tuple[int, str]:
    """The test suite in one release's environment: its exit status and its counts."""
    junit_xml = matrix_dir / f"results-{release}.xml"
    junit_xml.unlink(missing_ok=True)
    print(f"\n=== transformers {release} ===", flush=True)
    completed = subprocess.run(
        [str(python), "-m", "pytest", "tests", "-q", f"--junitxml={junit_xml}", *pytest_args],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    counts = test_counts(junit_xml)
    return completed.returncode, f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"


def run_self_check(python: Path, release: str, matrix_dir: Path, jobs: int) -> tuple[int, str]:
    """`python -m patches check` in one release's environment (its output kept in `.matrix/check-<release>.log`):
    its exit status and the families `apply()` leaves out there. With several at once, each gets one thread: the tiny
    models are too small to gain from more, and the runs would contend for the cores."""
    log = matrix_dir / f"check-{release}.log"
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    if jobs > 1:
        environment["OMP_NUM_THREADS"] = "1"
    with log.open("w", encoding="utf-8") as output:
        completed = subprocess.run(
            [str(python), "-m", "patches", "check"],
            cwd=REPO_ROOT,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    lines = log.read_text(encoding="utf-8").splitlines()
    # Printed whole, at once (runs at the same time do not interleave their lines): failed, or its last lines
    shown = lines if completed.returncode != 0 else lines[-3:]
    print("\n".join([f"\n=== transformers {release}: python -m patches check ===", *shown]), flush=True)
    left_out = [line.split("|")[1].strip() for line in lines if "| left out by apply()" in line]
    return completed.returncode, f"left out: {', '.join(left_out)}" if left_out else ""


def main() -> int:
    """Makes the environments (ahead, in a thread), runs the suite or the self-check in each, prints the table; the
    exit status is non-zero if any release failed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--releases",
        nargs="+",
        help="transformers releases (default: TESTED_VERSIONS, or with --self-check SELF_CHECKED_RELEASES)",
    )
    parser.add_argument("--self-check", action="store_true", help="run `python -m patches check`, not the suite")
    parser.add_argument("--torch-version", default="2.13.0", help="torch release shared by every environment")
    parser.add_argument("--matrix-dir", type=Path, default=REPO_ROOT / ".matrix", help="where the environments live")
    parser.add_argument(
        "--jobs", type=int, default=1, help="self-checks run at once, each on one thread (with --self-check only)"
    )
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    releases = args.releases or list(SELF_CHECKED_RELEASES if args.self_check else TESTED_VERSIONS)
    if args.jobs < 1 or (args.jobs > 1 and not args.self_check):
        parser.error(f"--jobs {args.jobs}: a number of self-checks from 1 (with --self-check; a suite takes -n)")

    args.matrix_dir.mkdir(exist_ok=True)
    torch_dir = shared_torch(args.matrix_dir, args.torch_version)
    # The environments are made one after another in a thread, ahead of the runs: pip waits mostly on the network and
    # the disk while a run keeps the cores busy
    with ThreadPoolExecutor(max_workers=1) as installer, ThreadPoolExecutor(max_workers=args.jobs) as runner:
        environments = [
            installer.submit(timed, release_environment, args.matrix_dir, release, torch_dir, not args.self_check)
            for release in releases
        ]
        runs = [runner.submit(run_one, args, environment) for environment in environments]
        results = [(release, *run.result()) for release, run in zip(releases, runs)]

    print(f"\n| transformers | {'self-check' if args.self_check else 'suite'} | | set-up (s) | run (s) |")
    print("|---|---|---|---|---|")
    for release, returncode, summary, run_seconds, install_seconds in results:
        result = "passed" if returncode == 0 else f"FAILED (exit {returncode})"
        print(f"| {release} | {result} | {summary} | {install_seconds:.0f} | {run_seconds:.0f} |")
    return 0 if all(returncode == 0 for _, returncode, *_ in results) else 1


def timed(function, *args):
    """`function(*args)` and the seconds it took."""
    started = time.monotonic()
    return function(*args), time.monotonic() - started


def run_one(args, environment) -> tuple[int, str, float, float]:
    """The suite or the self-check in one release's environment, once it is made: exit status, summary, seconds of
    the run and of the set-up."""
    (python, release), install_seconds = environment.result()
    started = time.monotonic()
    if args.self_check:
        returncode, summary = run_self_check(python, release, args.matrix_dir, args.jobs)
    else:
        returncode, summary = run_suite(python, release, args.matrix_dir, args.pytest_args)
    return returncode, summary, time.monotonic() - started, install_seconds


if __name__ == "__main__":
    sys.exit(main())
