"""
Command line of the patches:

    python -m patches check            # every covered model and decoding path across the switch, patched
    python -m patches check --force    # the same on a transformers release outside the tested range
    python -m patches status           # what `patches.apply()` would patch and refuse here, without keeping it
"""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m patches", description=__doc__.split("\n\n")[0].strip())
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="decode tiny models across the RoPE switch, patched, and compare")
    check_parser.add_argument(
        "--force", action="store_true", help="check a release outside the tested range, or with refused functions"
    )
    commands.add_parser("status", help="apply, print the status, revert")
    args = parser.parse_args(argv)

    import patches

    if args.command == "status":
        with patches.applied(force=True):
            print(patches.status())
        return 0
    return 0 if patches.check(force=args.force).passed else 1


if __name__ == "__main__":
    sys.exit(main())
