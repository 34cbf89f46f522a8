"""The ``patchscope`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ._version import __version__


def _cmd_sites(args: argparse.Namespace) -> int:
    from .models import load_model
    from .sites import resolve, sites

    model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    for name in sites(model):
        ref = resolve(model, name)
        module_name = next(n for n, m in model.named_modules() if m is ref.module)
        print(f"{name:32s} {ref.point:6s} of {module_name}")
    return 0


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="google/gemma-2-2b", help="hub id, preset name or local directory")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchscope", description=__doc__)
    parser.add_argument("--version", action="version", version=f"patchscope {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    sites_parser = commands.add_parser("sites", help="list the hook sites of a model and the HF module behind each")
    _add_model_flags(sites_parser)
    sites_parser.set_defaults(run=_cmd_sites)
    for register in _EXTRA_COMMANDS:
        register(commands)
    return parser


_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (ValueError, RuntimeError, FileNotFoundError, IndexError) as error:
        print(f"patchscope {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
