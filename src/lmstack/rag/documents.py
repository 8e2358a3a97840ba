"""Where the documents of an index come from: a folder, a JSONL file, or tinyworld's knowledge base.

    load_documents("notes/")          # every .txt/.md file below it; id = path relative to the folder
    load_documents("docs.jsonl")      # one {"id": str, "text": str} per line
    load_documents("tinyworld")       # tinyworld's knowledge base (seed 0): entities never in training
    tinyworld_world_pairs()           # (question, document) about the pretraining world, for an encoder

Each returns [(doc_id, text)] in a stable order. Every bad input names the file (and line)
and what is expected.
"""
from __future__ import annotations

import json
from pathlib import Path

from lmstack.utils import LmstackError

TEXT_SUFFIXES = (".txt", ".md")


def tinyworld_kb(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(docs {"id","title","text"}, questions {"prompt","answer","doc_id"}) of tinyworld's KB.
    The KB depends on the seed only, so the smallest corpus size is drawn."""
    from lmstack.data.tinyworld import TinyWorldConfig, generate

    corpus = generate(TinyWorldConfig(seed=seed, size_mb=0.001))
    return corpus.kb_docs, corpus.kb_questions


def tinyworld_world_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """(question, document) pairs about the *pretraining* world's countries and people (whose
    facts the training text states), in the knowledge base's formats: training data for a
    retrieval encoder that never shows it a knowledge-base entity or question."""
    from lmstack.data.tinyworld import TinyWorldConfig, generate
    from lmstack.data.tinyworld_world import entity_doc, person_facts, qa

    world = generate(TinyWorldConfig(seed=seed, size_mb=0.001)).world
    country_of = {cap: c for c, cap in world.countries.items()}
    pairs = [(qa("capital", c, cap)[0], f"{c} is a country. the capital of {c} is {cap}.")
             for c, cap in world.countries.items()]
    for p in world.people:
        doc = entity_doc(p, country_of[p.city])
        pairs += [(qa(r, s, o)[0], doc) for r, s, o in person_facts(p)]
    return pairs


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmstackError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None


def load_documents(source: str, seed: int = 0) -> list[tuple[str, str]]:
    if source == "tinyworld":
        return [(d["id"], d["text"]) for d in tinyworld_kb(seed)[0]]
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise LmstackError(f"folder {path} holds no {'/'.join(TEXT_SUFFIXES)} files; add some or point at "
                               f"a .jsonl file")
        return [(p.relative_to(path).as_posix(), _read(p)) for p in files]
    if path.is_file() and path.suffix.lower() == ".jsonl":
        docs = []
        for n, line in enumerate(_read(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LmstackError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("id"), (str, int)) \
                    or not isinstance(row.get("text"), str):
                raise LmstackError(f'{path}:{n}: each line must be {{"id": str, "text": str}}')
            docs.append((str(row["id"]), row["text"]))
        return docs
    if path.is_file():
        raise LmstackError(f"{path}: give a folder of .txt/.md files, a .jsonl file, or 'tinyworld'")
    raise LmstackError(f"{source!r} does not exist; give a folder of .txt/.md files, a .jsonl file with "
                       f'{{"id", "text"}} lines, or \'tinyworld\'')
