"""
Command line of the patches:

    python -m patches check            # every covered model and decoding path across the switch, patched
    python -m patches check --force    # the same on a transformers release outside the tested range
    python -m patches status           # what `patches.apply()` would patch and refuse here, without keeping it
    python -m patches serve MODEL ...  # `transformers serve MODEL ...` in this process, with the patches applied
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
    serve_parser = commands.add_parser(
        "serve", help="`transformers serve` with the patches applied; every argument after `serve` is its own"
    )
    serve_parser.add_argument(
        "serve_arguments", nargs=argparse.REMAINDER, help="the arguments of `transformers serve`"
    )
    args = parser.parse_args(argv)

    import patches

    if args.command == "serve":
        return serve(args.serve_arguments)
    if args.command == "status":
        with patches.applied(force=True):
            print(patches.status())
        return 0
    return 0 if patches.check(force=args.force).passed else 1


def serve(serve_arguments: list[str]) -> int:
    """Runs transformers' command line as `transformers serve ...` in this process, once the patches are applied: the
    server decodes in this process's threads, or (5.25 on) in a process it spawns for each model, which applies them
    there too. A server the patches cannot reach is not started."""
    import patches
    from patches.coverage import SERVING

    status = patches.apply()
    if SERVING in status.unprotected:
        print(
            f"python -m patches serve: not started, since its model processes would decode unpatched: "
            f"{status.unprotected[SERVING]}",
            file=sys.stderr,
        )
        return 2
    try:
        from transformers.cli.transformers import main as transformers_main  # 5.x
    except ImportError:
        from transformers.commands.transformers_cli import main as transformers_main  # 4.x
    sys.argv = ["transformers", "serve", *serve_arguments]
    return transformers_main() or 0


if __name__ == "__main__":
    sys.exit(main())
