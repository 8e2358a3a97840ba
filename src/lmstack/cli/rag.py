"""`lmstack rag`: build a retrieval index over documents, and answer questions from it.

    lmstack rag index notes/ --out idx --run runs/tiny        # BM25 + dense embeddings of runs/tiny
    lmstack rag index docs.jsonl --out idx                    # BM25 only ({"id", "text"} lines)
    lmstack rag index tinyworld --out idx --run runs/tiny     # tinyworld's knowledge base
    lmstack rag index tinyworld --out idx --run runs/tiny --encoder-steps 150   # + a trained encoder
    lmstack rag ask runs/tiny idx "where does Bolo live?" --k 3

`ask` prints the answer with numbered citations, then the cited sources with their document
ids and character spans; when nothing relevant is retrieved it abstains.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.cli.options import Parser, add_options, build_options
from lmstack.utils import LmstackError

MODES = ("auto", "bm25", "dense", "hybrid", "none")


@dataclass
class RagIndexOptions:
    out: str = field(default="", metadata={"help": "index folder to write (required)"})
    run: str | None = field(default=None, metadata={
        "help": "run or HF folder: its tokenizer counts chunk tokens and its model embeds the chunks "
                "(without it: BM25 only, chunks counted in bytes)"})
    chunk_tokens: int = field(default=128, metadata={"help": "tokens per chunk"})
    overlap: int = field(default=32, metadata={"help": "tokens shared by neighbouring chunks"})
    layer: int = field(default=0, metadata={
        "help": "hidden-state layer mean-pooled into embeddings (0 = token embeddings: the best recall on "
                "tinyworld's KB, see benchmarks/bench_rag.py; -1 = last layer)"})
    encoder_steps: int = field(default=0, metadata={
        "help": "train a small encoder contrastively on the documents for this many steps and embed with it "
                "instead of --layer (rag/contrastive.py; kept in IDX/encoder; DOCS=tinyworld also trains on "
                "questions about the pretraining world). 0 = no encoder"})
    seed: int = field(default=0, metadata={"help": "tinyworld seed (DOCS=tinyworld)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})


@dataclass
class RagAskOptions:
    mode: str = field(default="auto", metadata={
        "help": "auto (bm25: the best recall and abstention on tinyworld's KB, see benchmarks/bench_rag.py; for an "
                "index embedded by a trained encoder (--encoder-steps), hybrid with that encoder, abstaining when "
                "BM25 finds nothing) | bm25 | dense | hybrid (RRF of both) | none (closed book)"})
    k: int = field(default=3, metadata={"help": "chunks put in the prompt"})
    bm25_min_score: float | None = field(default=0.85, metadata={
        "help": "BM25 relevance floor: below it a chunk is not relevant (all below: abstain); on tinyworld's "
                "KB, 0.85 separates questions about known names from questions about unknown ones"})
    dense_min_score: float | None = field(default=None, metadata={"help": "cosine relevance floor (none = off)"})
    max_tokens: int = field(default=16, metadata={"help": "most tokens of the answer"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})


def byte_tokenizer():
    """Every byte one token: the chunk unit when no run's tokenizer is given."""
    from lmstack.tokenizer import Tokenizer
    return Tokenizer({i: bytes([i]) for i in range(256)}, [])


def _index(args) -> int:
    from lmstack.rag import DenseEncoder, Index, load_documents

    opts: RagIndexOptions = build_options(RagIndexOptions, args)
    if not opts.out:
        raise LmstackError("--out IDX is required: the index folder to write")
    docs = load_documents(args.docs, seed=opts.seed)
    encoder, tok = None, byte_tokenizer()
    if opts.run:
        from lmstack.infer.loader import load
        from lmstack.utils import pick_device
        model, tok, _ = load(opts.run, device=pick_device(opts.device))      # no engine: no KV cache
        if tok is None:
            raise LmstackError(f"{opts.run} has no tokenizer.json; chunking needs the run's tokenizer")
        encoder = DenseEncoder(model, tok, layer=opts.layer)
    elif opts.encoder_steps:
        raise LmstackError("--encoder-steps needs --run: the encoder starts from the run's model")
    if opts.encoder_steps:
        return _index_with_encoder(args, opts, docs, model, tok)
    index = Index.build(docs, tok, chunk_tokens=opts.chunk_tokens, overlap=opts.overlap, encoder=encoder)
    index.save(opts.out)
    dense = f", dense dim {index.embeddings.shape[1]} (layer {encoder.layer})" if encoder else ", BM25 only"
    print(f"indexed {len(docs)} documents as {len(index)} chunks into {opts.out}{dense}")
    return 0


def _index_with_encoder(args, opts: RagIndexOptions, docs, model, tok) -> int:
    """Train the encoder in a scratch folder beside IDX, embed with it, then keep it in IDX/encoder."""
    import shutil
    import tempfile
    from pathlib import Path

    from lmstack.rag import Index, tinyworld_world_pairs, train_encoder
    from lmstack.rag.contrastive import ENCODER_DIR

    if opts.encoder_steps < 0:
        raise LmstackError(f"--encoder-steps must be >= 0, got {opts.encoder_steps}")
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pairs = tinyworld_world_pairs(opts.seed) if args.docs == "tinyworld" else None
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.encoder-") as tmp:
        encoder, result = train_encoder(model, tok, docs, Path(tmp) / ENCODER_DIR, pairs=pairs,
                                        steps=opts.encoder_steps, chunk_tokens=opts.chunk_tokens,
                                        overlap=opts.overlap, device=str(next(model.parameters()).device))
        index = Index.build(docs, tok, chunk_tokens=opts.chunk_tokens, overlap=opts.overlap, encoder=encoder)
        index.save(out)
        shutil.copytree(Path(tmp) / ENCODER_DIR, out / ENCODER_DIR,
                        ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl", "tb", "train_config.json"))
    print(f"indexed {len(docs)} documents as {len(index)} chunks into {out}, dense dim {encoder.dim} from an "
          f"encoder trained {result['steps']} steps (final loss {result['train_loss']:.3f}, in {out / ENCODER_DIR})")
    return 0


def make_retriever(mode: str, index, llm, opts: RagAskOptions, index_dir: str | None = None):
    """The retriever a mode names (None for closed book). `index_dir`: where an index embedded
    by a trained encoder keeps it (IDX/encoder)."""
    from lmstack.rag import BM25Retriever, ContrastiveEncoder, DenseRetriever, HybridRetriever
    from lmstack.rag.contrastive import query_encoder

    if mode not in MODES:
        raise LmstackError(f"unknown --mode {mode!r}; valid: {', '.join(MODES)}")
    trained = (index.encoder or {}).get("kind") == ContrastiveEncoder.kind
    auto = mode == "auto"
    if auto:
        mode = "hybrid" if trained else "bm25"
    if mode == "none":
        return None
    bm25 = BM25Retriever(index, opts.bm25_min_score)
    if mode == "bm25":
        return bm25
    encoder = query_encoder(index_dir or ".", index, llm.model, llm.tokenizer)
    dense = DenseRetriever(index, encoder, opts.dense_min_score)
    if mode == "dense":
        return dense
    # auto: BM25's floor decides whether anything is relevant (the encoder's cosine has no
    # calibrated one), the fusion decides the order
    return HybridRetriever([bm25, dense], gate=bm25 if auto else None)


def _ask(args) -> int:
    from lmstack.infer import LLM
    from lmstack.rag import Index, answer

    opts: RagAskOptions = build_options(RagAskOptions, args)
    index = Index.load(args.index)
    llm = LLM(args.model, device=opts.device, max_num_seqs=1)
    if llm.tokenizer is None:
        raise LmstackError(f"{args.model} has no tokenizer.json; `rag ask` needs text in and out")
    ans = answer(llm, make_retriever(opts.mode, index, llm, opts, args.index), args.question, k=opts.k,
                 max_tokens=opts.max_tokens)
    if ans.error:
        raise LmstackError(ans.error)
    print(ans.text)
    for n in ans.citations:
        if 1 <= n <= len(ans.hits):
            c = ans.hits[n - 1].chunk
            print(f"[{n}] {c.doc_id} chars {c.start}-{c.end}: {c.text.strip()}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("rag", help="retrieval-augmented generation: index documents, ask questions",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="rag_command", metavar="SUBCOMMAND", parser_class=Parser)
    i = sub.add_parser("index", help="chunk, BM25-index and embed documents into an index folder",
                       description="Build an index from DOCS: a folder of .txt/.md files, a JSONL file with "
                                   "{\"id\", \"text\"} lines, or 'tinyworld' (its knowledge base).")
    i.add_argument("docs", metavar="DOCS", help="folder, .jsonl file, or tinyworld")
    add_options(i, RagIndexOptions, recipe=False)
    i.set_defaults(func=_index)
    a = sub.add_parser("ask", help="answer a question from an index, with citations",
                       description="Retrieve chunks for QUESTION from IDX and answer with the model of RUN.")
    a.add_argument("model", metavar="RUN", help="run directory or Hugging Face checkpoint folder")
    a.add_argument("index", metavar="IDX", help="index folder made by `lmstack rag index`")
    a.add_argument("question", help="the question")
    add_options(a, RagAskOptions, recipe=False)
    a.set_defaults(func=_ask)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
