"""`lmstack serve RUN_DIR|HF_DIR`: an OpenAI-compatible server plus the web dashboard.

    lmstack serve runs/tiny                         # http://127.0.0.1:8000/ (dashboard), /v1/...
    lmstack serve runs/tiny --port 9000 --api-key sk-local --max-n 4
    lmstack serve hf/qwen2-0.5b --chat-template chatml.jinja    # replace the folder's template
    lmstack serve runs/base --lora sql=adapters/sql --lora chat=adapters/chat   # several LoRA adapters
    lmstack serve runs/a --log-requests logs/req.jsonl --log-sample 0.1 --shadow runs/b   # then:
    lmstack eval compare logs/req.jsonl
    lmstack serve runs/a --log-requests logs/req.jsonl --ab-model runs/b --ab-percent 20
    lmstack serve runs/chat --rag-index idx             # chat answers from an index, with `sources`

With --lora, clients pick an adapter by its name in the request's `model` field (the base
keeps its own name); /v1/models lists them all. Each folder is a PEFT adapter for this base
(lmstack.finetune.save_adapter, or PEFT's); every one is checked before the server listens.

Chat requests are rendered by the folder's own Jinja chat template (tokenizer_config.json
or chat_template.jinja, as Hugging Face checkpoints ship it), by --chat-template FILE in
its place, or, for lmstack run directories, by lmstack's template.

Evaluation in production (opt-in; lmstack.serve.production): --log-requests appends the
sampled requests and answers to a JSONL file; --shadow answers them too with another model,
logged and never returned; --ab-model answers --ab-percent of the requests (split by a hash
of the client's X-Request-Id, so a retry lands on the same model). Both extra models must
share the served model's tokenizer.

With --rag-index IDX (made by `lmstack rag index`), a chat request's last user message is
answered from the chunks retrieved for it, listed in the response's `sources`; nothing
relevant retrieved: an abstention, the model not asked (lmstack.serve.retrieval). The
retriever is `lmstack rag ask`'s for --rag-mode: auto is BM25, or for an index embedded by
a trained encoder (--encoder-steps) that encoder fused with BM25 (IDX/encoder embeds the
queries). A request sends "retrieval": false to be answered without.

Binds to loopback unless --host says otherwise; a non-loopback host without --api-key
gets a warning, because anyone who can reach the port can then use the model.
"""
from __future__ import annotations

import argparse
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
    max_tokenize_tokens: int = field(default=8192, metadata={"help": "longest text the dashboard's token view "
                                                                      "(/v1/internal/tokenize) answers for"})
    chat_template: str | None = field(default=None, metadata={"help": "file holding a Jinja chat template "
                                                                       "(as in HF tokenizer_config.json) to use "
                                                                       "instead of the model's"})
    max_num_seqs: int = field(default=64, metadata={"help": "engine: sequences in one batch (1 = no "
                                                             "continuous batching)"})
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "engine: tokens per step"})
    block_size: int = field(default=16, metadata={"help": "engine: KV-cache block size in tokens"})
    kv_cache_tokens: int | None = field(default=None, metadata={"help": "engine: KV-cache capacity in tokens"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "engine: reuse KV blocks of shared "
                                                                         "prompt prefixes"})
    lora: list[str] | None = field(default=None, metadata={"cli": False, "help": "LoRA adapters as NAME=DIR"})
    log_requests: str | None = field(default=None, metadata={"help": "append requests and answers to this "
                                                                      "JSONL file (opt-in request log)"})
    log_sample: float = field(default=1.0, metadata={"help": "fraction of requests logged (by a hash of their id)"})
    shadow: str | None = field(default=None, metadata={"help": "model folder that also answers the logged "
                                                               "requests; its answers are logged, not returned"})
    ab_model: str | None = field(default=None, metadata={"help": "model folder that answers --ab-percent of "
                                                                 "the requests (an A/B split)"})
    ab_percent: float = field(default=0.0, metadata={"help": "percentage of requests answered by --ab-model"})
    rag_index: str | None = field(default=None, metadata={"help": "answer chat requests from this index "
                                                                   "(lmstack rag index), sources in the response"})
    rag_mode: str = field(default="auto", metadata={"help": "auto | bm25 | dense | hybrid (as lmstack rag ask "
                                                            "--mode; auto uses the index's trained encoder)"})
    rag_k: int = field(default=3, metadata={"help": "chunks put in the prompt"})
    rag_bm25_min_score: float | None = field(default=0.85, metadata={"help": "BM25 relevance floor (as lmstack "
                                                                             "rag ask --bm25-min-score)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})
    log_level: str = field(default="info", metadata={"help": "uvicorn log level"})


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible API server and web dashboard",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="RUN_DIR|HF_DIR", help="run directory or Hugging Face checkpoint folder")
    add_options(p, ServeOptions)
    p.add_argument("--lora", dest="lora", action="append", default=argparse.SUPPRESS, metavar="NAME=DIR",
                   help="serve the PEFT LoRA adapter in DIR as model NAME, in the same batches as the base; "
                        "repeat for more adapters")
    p.set_defaults(func=handler)


def lora_dirs(specs: list[str] | None, served_name: str) -> dict[str, str] | None:
    """['sql=adapters/sql', ...] -> {'sql': 'adapters/sql', ...}, each NAME=DIR checked."""
    if not specs:
        return None
    out: dict[str, str] = {}
    for spec in specs:
        name, eq, path = str(spec).partition("=")
        name, path = name.strip(), path.strip()
        if not eq or not name or not path:
            raise LmstackError(f"--lora {spec!r}: expected NAME=DIR, e.g. --lora sql=adapters/sql")
        if name in out or name == served_name:
            raise LmstackError(f"--lora {spec!r}: the name {name!r} is already taken "
                               f"({'by another --lora' if name in out else 'by the base model'}); pick another")
        if not Path(path).is_dir():
            raise LmstackError(f"--lora {spec!r}: folder {path} not found; give a PEFT adapter folder "
                               "(adapter_config.json + adapter_model.safetensors)")
        out[name] = path
    return out


def engine_kwargs(opts: ServeOptions) -> dict:
    return {"max_num_seqs": opts.max_num_seqs, "max_num_batched_tokens": opts.max_num_batched_tokens,
            "block_size": opts.block_size, "kv_cache_tokens": opts.kv_cache_tokens,
            "enable_prefix_caching": opts.enable_prefix_caching, "device": opts.device}


def _production(opts: ServeOptions):
    """The request log / shadow / A/B settings, or None when no flag asks for them."""
    if opts.log_requests is None and opts.shadow is None and opts.ab_model is None and not opts.ab_percent:
        return None
    from lmstack.serve.production import Production

    for flag, path in (("--shadow", opts.shadow), ("--ab-model", opts.ab_model)):
        if path is not None and not Path(path).is_dir():
            raise LmstackError(f"{flag} {path}: model directory not found")
    return Production(opts.log_requests, sample=opts.log_sample, shadow=opts.shadow, ab=opts.ab_model,
                      ab_percent=opts.ab_percent)


def _retrieval(opts: ServeOptions, engine):
    """The index's retriever as the server takes it (lmstack.rag.ServerRetrieval), or None."""
    if opts.rag_index is None:
        return None
    from lmstack.cli.rag import RagAskOptions, make_retriever
    from lmstack.rag import Index, ServerRetrieval

    if opts.rag_mode == "none":
        raise LmstackError("--rag-mode none answers without retrieval; leave out --rag-index instead")
    ask = RagAskOptions(mode=opts.rag_mode, k=opts.rag_k, bm25_min_score=opts.rag_bm25_min_score)
    index = Index.load(opts.rag_index)
    return ServerRetrieval(make_retriever(opts.rag_mode, index, engine, ask, opts.rag_index), k=opts.rag_k)


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
    from lmstack.tokenizer.chat_template import ChatTemplate

    if opts.chat_template is not None and not Path(opts.chat_template).is_file():
        raise LmstackError(f"--chat-template {opts.chat_template}: file not found; pass a file holding the "
                           "Jinja text of a chat template")
    served_name = opts.served_model_name or model_dir.resolve().name
    lora = lora_dirs(opts.lora, served_name)
    # Load the model, its adapters and the template here, before the server starts, so that
    # a bad directory, adapter or template is a one-line error.
    try:
        template = ChatTemplate.from_pretrained(model_dir, opts.chat_template)
        production = _production(opts)
        engine = AsyncLLM(str(model_dir), lora=lora, **engine_kwargs(opts))
        retrieval = _retrieval(opts, engine)
        if production is not None:      # build and check the extra models now: errors are one line
            production.start(engine, engine_kwargs(opts))
        app = create_app(engine, production=production, retrieval=retrieval, engine_kwargs=engine_kwargs(opts),
                         api_key=opts.api_key, max_n=min(opts.max_n, opts.max_num_seqs),
                         max_body_bytes=opts.max_body_bytes, served_model_name=served_name,
                         max_attention_tokens=opts.max_attention_tokens,
                         max_tokenize_tokens=opts.max_tokenize_tokens, chat_template=template)
        app.state.model_path = model_dir     # the dashboard reads the folder (is the model chat-tuned?)
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
