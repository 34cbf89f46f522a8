"""The ``patchscope`` command: a registry of subcommands, each in its own module.

A subcommand's module is imported only when that subcommand runs (or its ``--help`` is asked
for), so ``patchscope --help`` and ``--version`` never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from patchscope._version import __version__

# name -> (module, one-line help). Each module defines ``register(parser)`` and ``run(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "sites": ("patchscope.cli.sites", "list the hook sites of a model and the HF module behind each"),
    "profile": ("patchscope.cli.profile", "profile every neuron of a layer over a corpus into an atlas"),
    "sae": ("patchscope.cli.sae", "print the top SAE features of one token's residual vector"),
    "run": ("patchscope.cli.run", "the whole experiment: profile, extract, SAE, Patchscope; writes results.json"),
    "export": ("patchscope.cli.export", "rebuild an atlas folder's exports (neuron mapping, Parquet table) from its atlas"),
    "merge": ("patchscope.cli.merge", "merge the atlases of independent jobs over disjoint slices into one"),
    "sweep": (
        "patchscope.cli.sweep",
        "Patchscope sweep over source x target layers: precision@1, surprisal, reactivation, heatmaps",
    ),
    "report": ("patchscope.cli.report", "write a static, offline HTML dashboard of an atlas (index + a page per neuron)"),
}


DESCRIPTION = """\
Mechanistic interpretability on plain HuggingFace models: hook sites with TransformerLens names,
a neuron activation atlas over a corpus, Gemma Scope JumpReLU SAEs and Patchscopes. The command
"sites" lists a model's hook sites, "profile" builds an atlas, "sae" reads one token through an
SAE, and "run" does the whole experiment (profile, extract, SAE, Patchscope) into results.json.
"patchscope COMMAND --help" shows a command's flags.

examples:
  patchscope profile --model gemma-2-2b --dataset corpus.jsonl --split "[0:500]" --layer 12 --out atlas/
  patchscope run --model ./my-model --dataset notes.txt --split "" --layer 6 --out run/
"""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s own flags are loaded (all of them when None)."""
    parser = argparse.ArgumentParser(
        prog="patchscope", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"patchscope {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if command is None or command == name:
            module = importlib.import_module(module_name)
            module.register(sub)
            sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else "")
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    from patchscope.util.signals import Interrupted, raise_on_sigterm

    restore = raise_on_sigterm()
    try:
        return args.run(args)
    except Interrupted as stop:  # one line, not a traceback: what was saved and how to go on
        from patchscope.util.errors import as_flags

        print(f"patchscope {args.command}: {as_flags(str(stop), _flags(parser))}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"patchscope {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, IndexError) as error:
        from patchscope.util.errors import as_flags

        print(f"patchscope {args.command}: error: {as_flags(str(error), _flags(parser))}", file=sys.stderr)
        return 2
    finally:
        restore()


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option of the parser and its subcommands."""
    found = {option for action in parser._actions for option in action.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _flags(sub)
    return found


if __name__ == "__main__":
    sys.exit(main())
