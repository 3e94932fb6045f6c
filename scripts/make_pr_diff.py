"""
Writes the upstream pull requests for the fixes in `modeling_overrides/`, as a series: `out/pr/NN-<slug>.diff` (which
`git apply` applies to a transformers source tree on top of the ones before it) and `out/pr/NN-<slug>.md` (its
description).

    python scripts/make_pr_diff.py                                    # against the installed release, offline
    python scripts/make_pr_diff.py --transformers-src ~/transformers  # against a checkout of main
    python scripts/make_pr_diff.py --verify                           # also verify each one at its place
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from upstream_pr.diff import build_pristine_tree, unified_diff  # noqa: E402
from upstream_pr.series import SERIES_TEST_FILES  # noqa: E402
from upstream_pr.series.build import UnplaceableSeriesError, read_release, series_files  # noqa: E402
from upstream_pr.series.description import describe, measure  # noqa: E402
from upstream_pr.series.verify import verify_pull_request, write_texts  # noqa: E402


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument(
        "--transformers-src",
        type=Path,
        help="a transformers source tree in the upstream layout (src/transformers/..., tests/...); default: a "
        "pristine tree laid out from the installed release",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("out/pr"), help="where to write the series")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="verify each pull request on the tree the ones before it leave: its tests fail before it and pass "
        "with it, it applies, ruff finds nothing new",
    )
    return parser.parse_args()


def write_series(output_dir: Path, written: dict[str, tuple[str, str]]) -> None:
    """Writes `{name: (diff, description)}` as `NN-<slug>.diff/.md`, removing any earlier series first."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*output_dir.glob("[0-9][0-9]-*.diff"), *output_dir.glob("[0-9][0-9]-*.md")]:
        stale.unlink()
    for name, (diff, description) in written.items():
        (output_dir / f"{name}.diff").write_text(diff, encoding="utf-8")
        (output_dir / f"{name}.md").write_text(description, encoding="utf-8")
        print(f"wrote {output_dir / name}.diff and .md")


def main() -> int:
    args = parse_arguments()
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        tree = args.transformers_src or build_pristine_tree(workdir / "pristine", SERIES_TEST_FILES)
        try:
            release = read_release(tree)
            series = series_files(tree)
        except UnplaceableSeriesError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        running_tree = workdir / "series"
        if args.verify:
            shutil.copytree(tree, running_tree, ignore=shutil.ignore_patterns("__pycache__"))
        written, all_ok = {}, True
        for files in series:
            report = figures = None
            if args.verify:
                report = verify_pull_request(running_tree, files, workdir)
                print(f"{files.name}:\n" + "\n".join(report.lines()))
                all_ok &= report.ok
                figures_before = measure(running_tree, files, with_tests=True)
                write_texts(running_tree, files.texts)
                figures_after = measure(running_tree, files)
                figures = None if figures_before is None else (figures_before, figures_after)
            written[files.name] = (unified_diff(files.texts), describe(files, release, report, figures))
    write_series(args.output_dir, written)
    if not all_ok:
        print("error: a pull request of the series did not verify", file=sys.stderr)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
