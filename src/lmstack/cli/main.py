"""`lmstack` entry point: one subcommand per module in this package.

Each subcommand module defines `register(subparsers)`, which adds its parser and sets
`func=` to a function taking the parsed args. Errors meant for users (`LmstackError`) print
as one line and exit 1.
"""
from __future__ import annotations

import importlib
import sys

from lmstack.cli.options import Parser
from lmstack.utils.errors import LmstackError

# Order is the order shown in --help.
COMMANDS = ["run", "data", "tokenizer", "train", "finetune", "align", "generate", "serve", "eval", "rag", "export"]


def build_parser() -> Parser:
    parser = Parser(prog="lmstack", description="The whole LLM stack: data, tokenizer, model, "
                    "training, inference, serving.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"lmstack.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"lmstack.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except LmstackError as e:
        print(f"lmstack {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` or similar that stopped reading: not an error. Point
        # stdout at devnull so the interpreter's final flush does not raise again.
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
