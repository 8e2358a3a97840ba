"""`lmstack export RUN`: write a run as a GGUF file (llama.cpp) or a Hugging Face folder.

    lmstack export runs/tiny --format gguf --type q8_0 --out tiny-q8_0.gguf
    lmstack export runs/tiny --format hf --out tiny-hf            # NF4 runs: bitsandbytes layout
    lmstack export runs/tiny-int4 --format hf --dequantize --out tiny-hf

GGUF types: f32, f16, q8_0, q4_0 (norms stay f32; a tensor whose rows are not a multiple of
32 is stored as f16 and listed). Every check (format, type, output path, what the format can
express) runs before anything is written, and the output appears only when complete.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from lmstack.cli.options import add_options, build_options
from lmstack.utils import LmstackError

FORMATS = ("gguf", "hf")


@dataclass
class ExportOptions:
    format: str = field(default="gguf", metadata={"help": "gguf (llama.cpp) or hf (Hugging Face folder)"})
    type: str = field(default="f16", metadata={"help": "GGUF tensor type: f32, f16, q8_0 or q4_0"})
    out: str | None = field(default=None, metadata={"help": "output: a .gguf file, or a folder for --format hf"})
    name: str | None = field(default=None, metadata={"help": "GGUF general.name (default: the file name)"})
    dequantize: bool = field(default=False, metadata={"help": "hf: write a quantized run's weights as float"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output"})


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a run to GGUF or a Hugging Face folder",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN_DIR|HF_DIR", help="run directory or Hugging Face checkpoint folder")
    add_options(p, ExportOptions, recipe=False)
    p.set_defaults(func=handler)


def _check(opts: ExportOptions) -> None:
    from lmstack.quant.export import GGUF_TYPES
    from lmstack.quant.export.gguf_file import check_output_file
    from lmstack.quant.export.hf_bnb import check_output_folder

    if opts.format not in FORMATS:
        raise LmstackError(f"--format {opts.format!r} is not supported; choose one of {list(FORMATS)}")
    if opts.out is None:
        raise LmstackError("--out is required: a .gguf file for --format gguf, a folder for --format hf")
    if opts.format == "gguf":
        if opts.type not in GGUF_TYPES:
            raise LmstackError(f"--type {opts.type!r} is not a GGUF type we write; choose one of {list(GGUF_TYPES)}")
        if opts.dequantize:
            raise LmstackError("--dequantize applies to --format hf; GGUF export always starts from the float "
                               "weights a quantized run computes with")
        check_output_file(opts.out, opts.overwrite)
    else:
        check_output_folder(opts.out, opts.overwrite)


def handler(args) -> int:
    opts: ExportOptions = build_options(ExportOptions, args)
    _check(opts)                                   # before the (possibly slow) load
    import torch

    from lmstack.infer.loader import load
    from lmstack.quant.export import export_gguf, export_hf_folder

    model, tokenizer, eos = load(args.run, device=torch.device("cpu"))
    if opts.format == "gguf":
        if tokenizer is None:
            raise LmstackError(f"{args.run} has no tokenizer.json; GGUF files carry the tokenizer, so export needs it")
        r = export_gguf(model, tokenizer, opts.out, type=opts.type, name=opts.name, eos_token_id=eos,
                        overwrite=opts.overwrite)
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(r.tensor_types.values()).items()))
        print(f"wrote {r.path} ({r.nbytes / 2**20:.1f} MiB, {len(r.tensor_types)} tensors: {kinds})")
        if r.fallbacks:
            print(f"stored as f16 (rows not a multiple of 32): {', '.join(r.fallbacks)}")
    else:
        path = export_hf_folder(model, opts.out, tokenizer=tokenizer, eos_token_id=eos, dequantize=opts.dequantize,
                                overwrite=opts.overwrite)
        print(f"wrote {path}")
    return 0
