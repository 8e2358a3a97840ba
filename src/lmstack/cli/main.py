"""`lmstack` entry point: one subcommand per module in this package.

Each subcommand module defines `register(subparsers)`, which adds its parser and sets
`func=` to a function taking the parsed args. Errors meant for users (`LmstackError`) print
as one line and exit 1.

Subcommand modules import torch and most of the library, which takes seconds. So the
top-level parser is built from the static table `COMMANDS` below, and only the module of the
command being run (or whose `--help` is asked) is imported: `lmstack --help` stays well
under a second. A test keeps each entry equal to the help its module registers.
"""
from __future__ import annotations

import importlib
import sys

from lmstack.cli.options import Parser
from lmstack.utils.errors import LmstackError

# name -> one-line help, in the order shown by `lmstack --help`. Adding a command: its module
# lmstack/cli/<name>.py with register(subparsers), and one line here.
COMMANDS = {
    "run": "the main job: pretrain -> sft -> dpo -> grpo -> int4 -> measure -> report",
    "data": "build and inspect data directories",
    "tokenizer": "train a BPE tokenizer; visualize tokens",
    "train": "pretrain a model from a recipe and flags.",
    "finetune": "supervised finetuning (full, LoRA, QLoRA) of a run or a Hugging Face folder.",
    "align": "align a model with a reward model, DPO, PPO or GRPO.",
    "generate": "generate text from a model, streamed",
    "serve": "OpenAI-compatible API server and web dashboard",
    "eval": "evaluate a model on tasks (generation, multiple choice, perplexity), optionally with an LLM judge",
    "rag": "retrieval-augmented generation: index documents, ask questions",
    "export": "export a run to GGUF or a Hugging Face folder",
    "lab": "build, plot and break experiments, one command each, with figures and numbers",
}


def _register(sub, name: str) -> bool:
    """Import lmstack.cli.<name> and let it add its parser; False if the module does not exist."""
    try:
        module = importlib.import_module(f"lmstack.cli.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"lmstack.cli.{name}":
            return False
        raise
    module.register(sub)
    return True


def build_parser(command: str | None = None) -> Parser:
    """The `lmstack` parser. Every command is listed from COMMANDS; only `command`'s module is
    imported and gets its full parser (None: none, enough for the top-level --help)."""
    parser = Parser(prog="lmstack", description="The whole LLM stack: data, tokenizer, model, "
                    "training, inference, serving.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, help_line in COMMANDS.items():
        if name == command and _register(sub, name):
            continue
        sub.add_parser(name, help=help_line, add_help=False)   # listed only; never parsed
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Top-level `lmstack` has no options of its own besides --help, so the first word that is
    # not an option is the command.
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        if args.command in COMMANDS:
            print(f"lmstack {args.command}: error: this command is not available in this install",
                  file=sys.stderr)
            return 1
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
