"""
Writes the upstream pull request for the fixes in `modeling_overrides/`: a unified diff that `git apply` applies to a
transformers source tree, and its description.

    python scripts/make_pr_diff.py                                  # against the installed release, offline
    python scripts/make_pr_diff.py --transformers-src ~/transformers  # against a checkout
    python scripts/make_pr_diff.py --verify                          # also apply it to a copy and run its tests
    python scripts/make_pr_diff.py --scope phi3                      # the minimal pull request: the Phi-3 family
"""

import argparse
import sys
import tempfile
from pathlib import Path

from upstream_pr.description import describe
from upstream_pr.diff import build_pristine_tree, changed_paths, planned_texts, unified_diff
from upstream_pr.plan import UnrecognisedTreeError, make_plan, read_release
from upstream_pr.verify import verify


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument(
        "--transformers-src",
        type=Path,
        help="a transformers source tree in the upstream layout (src/transformers/..., tests/...); default: a "
        "pristine tree laid out from the installed release",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=Path("out/pr"), help="where to write the diff and description"
    )
    parser.add_argument(
        "--figures", type=Path, default=Path("out/strategies"), help="`make compare-strategies` output to quote"
    )
    parser.add_argument(
        "--verify", action="store_true", help="apply the diff to a copy of the tree and run its checks"
    )
    parser.add_argument(
        "--scope",
        default="all",
        help="`all` (every model the run-time patches cover) or a pull-request family of patches/coverage.py: `phi3`, "
        "the minimal pull request (the Phi-3 family's files, the shared RoPE update, the new module, its tests)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        tree = args.transformers_src or build_pristine_tree(Path(workdir) / "pristine")
        try:
            release = read_release(tree)
            plans = make_plan(tree, args.scope)
        except (UnrecognisedTreeError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        texts = planned_texts(tree, plans, args.scope)
        diff = unified_diff(texts)
        verification_lines = None
        if args.verify:
            report = verify(tree, Path(workdir), texts)
            verification_lines = report.lines()
            print("\n".join(verification_lines))
            if not report.ok:
                print("error: the diff did not verify", file=sys.stderr)
        description = describe(tree, args.figures, plans, verification_lines, args.scope)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    name = f"transformers-{release}" + ("" if args.scope == "all" else f"-{args.scope}")
    diff_path = args.output_dir / f"{name}.diff"
    description_path = args.output_dir / f"{name}.md"
    diff_path.write_text(diff, encoding="utf-8")
    description_path.write_text(description, encoding="utf-8")
    print(f"{len(changed_paths(texts))} files changed; wrote {diff_path} and {description_path}")
    return 0 if not args.verify or report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
