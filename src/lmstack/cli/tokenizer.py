"""`lmstack tokenizer`: train a byte-level BPE tokenizer, look at how it cuts text.

    lmstack tokenizer train --input corpus.txt more/ --vocab-size 4096 --out tokenizer.json
    lmstack tokenizer viz "Hello 世界 🌍" --tokenizer tokenizer.json --html tokens.html
    lmstack tokenizer viz --file notes.md --script code

Without --tokenizer, `viz` trains a small demo tokenizer (<= 512 tokens) on a built-in
multi-script sample and says so; pass --tokenizer for numbers that mean something.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmstack.cli.options import Parser, add_options, build_options
from lmstack.tokenizer import DEFAULT_SPECIAL_TOKENS, PATTERNS, Tokenizer
from lmstack.tokenizer.base import resolve_pattern
from lmstack.utils import ensure_writable_dir
from lmstack.utils.errors import LmstackError


@dataclass
class TokenizerTrainOptions:
    input: list[str] = field(default_factory=list, metadata={
        "cli": False, "help": "text files, folders (*.txt, *.md, *.jsonl) to train on"})
    vocab_size: int = field(default=4096, metadata={"help": "tokens in all: 256 bytes + merges + specials"})
    out: str = field(default="tokenizer.json", metadata={"help": "output tokenizer.json (HF format)"})
    pattern: str = field(default="gpt4", metadata={"help": f"pre-tokenization: {', '.join(PATTERNS)}"})
    special_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS),
                                      metadata={"help": "comma-separated special tokens"})
    min_frequency: int = field(default=2, metadata={"help": "stop merging when the best pair is rarer"})
    text_field: str = field(default="text", metadata={"help": "JSON field holding the text in .jsonl inputs"})

    def __post_init__(self):
        resolve_pattern(self.pattern)  # unknown name -> error listing the valid ones
        floor = 256 + len(self.special_tokens)
        if self.vocab_size < floor:
            raise LmstackError(f"vocab_size={self.vocab_size} is too small: it must be at least 256 bytes + "
                               f"{len(self.special_tokens)} special tokens = {floor}")


def _check_writable(path: Path) -> None:
    """Fail before training, not after, when the output cannot be written: create the
    folder and a scratch file in it now."""
    ensure_writable_dir(path.parent, "choose another output path")
    if path.is_dir():
        raise LmstackError(f"cannot write {path}: it is a folder; choose a file path")


def _train(args) -> int:
    opts = build_options(TokenizerTrainOptions, args)
    if not opts.input:
        raise LmstackError("no training text: pass --input FILE [FILE ...] (files or folders)")
    missing = [p for p in opts.input if not Path(p).exists()]
    if missing:
        raise LmstackError(f"input {missing[0]} does not exist; pass existing files or folders to --input")
    out = Path(opts.out)
    if out.is_dir():
        out = out / "tokenizer.json"
    _check_writable(out)
    from lmstack.data.corpora import load_path  # floor 2, used by the CLI only

    texts = [t for p in opts.input for t in load_path(p, field=opts.text_field)]
    tok = Tokenizer.train(texts, vocab_size=opts.vocab_size, pattern=opts.pattern,
                          special_tokens=opts.special_tokens, min_frequency=opts.min_frequency, show_progress=True)
    tok.save(out)
    note = "" if tok.n_vocab == opts.vocab_size else \
        f" (asked for {opts.vocab_size}: no pair occurs {opts.min_frequency}+ times any more)"
    print(f"wrote {out}: {tok.n_vocab} tokens = 256 bytes + {len(tok.merges)} merges + "
          f"{len(tok.special_tokens)} specials{note}")
    return 0


def _viz(args) -> int:
    from lmstack.tokenizer import viz

    if (args.text is None) == (args.file is None):
        raise LmstackError("give the text to show either as TEXT or as --file F (not both)")
    if args.script is not None and args.script not in viz.SCRIPTS:
        raise LmstackError(f"unknown --script {args.script!r}; valid: {', '.join(viz.SCRIPTS)}")
    if args.file is not None:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LmstackError(f"cannot read --file {args.file}: {e}; pass a UTF-8 text file") from None
    else:
        text = args.text
    if args.html:
        _check_writable(Path(args.html))
    if args.tokenizer:
        tok, name = Tokenizer.load(args.tokenizer), str(args.tokenizer)
    else:
        tok = viz.demo_tokenizer()
        name = f"demo tokenizer ({tok.n_vocab} tokens, trained on the built-in sample text)"
        print(f"no --tokenizer given: using a {name}", file=sys.stderr)
    ids = tok.encode(text, allowed_special="all")
    spans = viz.token_spans(tok, ids)
    rows = viz.script_stats(tok, text, args.script)
    print(viz.render_ansi(spans) if sys.stdout.isatty() or args.color else
          "|".join(t for t, _ in spans) + "\n\nids: " + " ".join("+".join(map(str, g)) for _, g in spans))
    print()
    print(viz.format_stats(rows))
    if args.html:
        from lmstack.utils.io import atomic_write_text
        atomic_write_text(args.html, viz.render_html(spans, rows, f"Tokens of {name}"))
        print(f"wrote {args.html}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train a BPE tokenizer; visualize tokens",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", parser_class=Parser)

    t = sub.add_parser("train", help="train a byte-level BPE tokenizer, write tokenizer.json",
                       description="Train a byte-level BPE tokenizer on text files; write a HF tokenizer.json.")
    t.add_argument("--input", nargs="+", metavar="FILE", default=argparse.SUPPRESS,
                   help="text files or folders (*.txt, *.md, *.jsonl) to train on")
    add_options(t, TokenizerTrainOptions)
    t.set_defaults(func=_train)

    v = sub.add_parser("viz", help="show token spans, ids and bytes-per-token per script",
                       description="Print coloured token spans with ids and bytes-per-token per script "
                                   "(latin, cjk, code, emoji, other); --html writes a page.")
    v.add_argument("text", nargs="?", default=None, help="text to tokenize (or use --file)")
    v.add_argument("--file", default=None, help="read the text from this UTF-8 file")
    v.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json or run dir (default: a demo tokenizer trained on a built-in sample)")
    v.add_argument("--html", default=None, metavar="OUT", help="also write an HTML page here")
    v.add_argument("--script", default=None, help="label all tokens as this script (latin, cjk, code, emoji, other) "
                   "instead of guessing per token")
    v.add_argument("--color", action="store_true", help="ANSI colours even when stdout is not a terminal")
    v.set_defaults(func=_viz)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
