"""`lmstack serve RUN_DIR|HF_DIR`: an OpenAI-compatible server plus the web dashboard.

    lmstack serve runs/tiny                         # http://127.0.0.1:8000/ (dashboard), /v1/...
    lmstack serve runs/tiny --port 9000 --api-key sk-local --max-n 4

Binds to loopback unless --host says otherwise; a non-loopback host without --api-key
gets a warning, because anyone who can reach the port can then use the model.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from lmstack.cli.options import add_options, build_options
from lmstack.utils.errors import LmstackError


@dataclass
class ServeOptions:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback by default)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY' on /v1/*"})
    served_model_name: str | None = field(default=None, metadata={"help": "model id clients send (default: "
                                                                          "the directory name)"})
    max_n: int = field(default=8, metadata={"help": "largest n (completions per prompt) a request may ask for"})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "largest request body; bigger ones get 413"})
    max_attention_tokens: int = field(default=64, metadata={"help": "longest prompt for the dashboard's "
                                                                     "attention maps"})
    max_num_seqs: int = field(default=64, metadata={"help": "engine: sequences in one batch (1 = no "
                                                             "continuous batching)"})
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "engine: tokens per step"})
    block_size: int = field(default=16, metadata={"help": "engine: KV-cache block size in tokens"})
    kv_cache_tokens: int | None = field(default=None, metadata={"help": "engine: KV-cache capacity in tokens"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "engine: reuse KV blocks of shared "
                                                                         "prompt prefixes"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})
    log_level: str = field(default="info", metadata={"help": "uvicorn log level"})


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible API server and web dashboard",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="RUN_DIR|HF_DIR", help="run directory or Hugging Face checkpoint folder")
    add_options(p, ServeOptions)
    p.set_defaults(func=handler)


def engine_kwargs(opts: ServeOptions) -> dict:
    return {"max_num_seqs": opts.max_num_seqs, "max_num_batched_tokens": opts.max_num_batched_tokens,
            "block_size": opts.block_size, "kv_cache_tokens": opts.kv_cache_tokens,
            "enable_prefix_caching": opts.enable_prefix_caching, "device": opts.device}


def handler(args) -> int:
    opts: ServeOptions = build_options(ServeOptions, args)
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise LmstackError(f"model directory {model_dir} not found; pass a run directory (runs/<name>) "
                           "or a Hugging Face checkpoint folder")
    if not 0 < opts.port < 65536:
        raise LmstackError(f"--port must be in 1..65535, got {opts.port}")
    try:
        import uvicorn

        from lmstack.serve.app import create_app
    except ImportError as e:
        raise LmstackError(f"serving needs the 'serve' extra ({e.name} is missing); "
                           "install it with: pip install 'lmstack[serve]'") from None
    if opts.host not in ("127.0.0.1", "localhost", "::1") and opts.api_key is None:
        print(f"warning: binding to {opts.host} without --api-key: anyone who can reach this port can use "
              "the model", file=sys.stderr)
    from lmstack.infer import AsyncLLM

    # Load the model here, before the server starts, so a bad directory is a one-line error.
    try:
        engine = AsyncLLM(str(model_dir), **engine_kwargs(opts))
        app = create_app(engine, api_key=opts.api_key, max_n=min(opts.max_n, opts.max_num_seqs),
                         max_body_bytes=opts.max_body_bytes,
                         served_model_name=opts.served_model_name or model_dir.resolve().name,
                         max_attention_tokens=opts.max_attention_tokens)
    except (ValueError, OSError) as e:
        raise LmstackError(str(e)) from None
    print(f"lmstack serve: http://{opts.host}:{opts.port}/ (dashboard), API at /v1, spec at /openapi.json",
          file=sys.stderr)
    try:
        uvicorn.run(app, host=opts.host, port=opts.port, log_level=opts.log_level)
    finally:
        import asyncio
        asyncio.run(engine.shutdown())
    return 0
