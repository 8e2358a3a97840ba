"""tinyworld: the embedded synthetic corpus, deterministic from a seed.

    from lmstack.data.tinyworld import TinyWorldConfig, generate
    corpus = generate(TinyWorldConfig(seed=0, size_mb=2.0))
    corpus.docs[i], corpus.records[i]     # pretraining text, and the task record it renders (or None)
    corpus.evals["arithmetic"]            # held-out probes {"task", "prompt", "answer"}

Documents mix, by bytes: short stories from a grammar, biographies stating world facts in
varied phrasings, fact questions, arithmetic (direct and with worked steps), instruction
tasks, and reading comprehension (answer from a context paragraph, which is how the
knowledge base is used later). The world (names and facts) depends only on the seed; the
size only decides how many documents are drawn. Items chosen by `held_out` are never drawn
into the corpus: they form the evaluation sets, so an exact-match score on them measures
generalisation, not recall of the probe itself.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from lmstack.data import tinyworld_tasks as tasks
from lmstack.data.tinyworld_world import (ANIMALS, COLOURS, JOBS, NameMaker, Person, World, biography,
                                          entity_doc, held_out, make_world, person_facts, qa, state)

PLACES = ["market", "park", "river", "hill", "forest", "school", "garden", "beach", "farm", "shop"]
THINGS = ["ball", "hat", "kite", "box", "cup", "book", "boat", "drum", "cake", "apple", "lamp", "bell"]
FEELINGS = ["happy", "sad", "tired", "excited", "scared", "proud"]
ADJECTIVES = ["big", "small", "old", "new", "shiny", "soft"]

# share of the corpus bytes per document kind
MIX = {"story": 0.25, "biography": 0.17, "facts": 0.10, "arithmetic": 0.12, "arithmetic_steps": 0.08,
       "instruction": 0.20, "reading": 0.08}


@dataclass
class TinyWorldConfig:
    seed: int = 0
    size_mb: float = 2.0            # pretraining text to draw, in 10**6 bytes
    n_countries: int = 12
    n_people: int = 48
    n_kb_countries: int = 8
    n_kb_people: int = 24
    n_eval: int = 200               # probes per evaluation set (fewer where the held-out space is smaller)
    mix: dict[str, float] = field(default_factory=lambda: dict(MIX))


@dataclass
class TinyWorldCorpus:
    world: World
    docs: list[str]
    records: list[dict | None]            # parallel to docs
    evals: dict[str, list[dict]]          # eval set name -> probes
    kb_docs: list[dict]                   # {"id", "title", "text"}
    kb_questions: list[dict]              # {"task": "kb", "prompt", "answer", "doc_id"}


def with_context(context: str, prompt: str) -> str:
    """A grounded prompt: the format of the reading task, used for retrieval (RAG) too."""
    return f"Context: {context}\n{prompt}"


# --------------------------------------------------------------------------- stories

def story(rng: random.Random, world: World) -> str:
    """A short story about one world person; every fact it mentions agrees with the world."""
    p = rng.choice(world.people)
    friend = rng.choice([q for q in world.people if q is not p])
    thing, place = rng.choice(THINGS), rng.choice(PLACES)
    s = [rng.choice([f"once upon a time, {p.name} lived in {p.city}.",
                     f"there was a {p.job} called {p.name} who lived in {p.city}.",
                     f"in the city of {p.city} there lived a {p.job} named {p.name}."]),
         rng.choice([f"{p.name} had a {p.kind} called {p.pet}.",
                     f"{p.name} and {p.pet} the {p.kind} were best friends.",
                     state(rng, "pet", p.name, p.pet)])]
    events = [
        f"one day, {p.name} went to the {place} with {p.pet}.",
        f"at the {place}, {p.name} found a {rng.choice(ADJECTIVES)} {thing}.",
        f"there {p.name} met {friend.name}, who is a {friend.job}.",
        f"{friend.name} said, \"i like your {thing}.\"",
        f"{p.pet} ran after a {rng.choice(ANIMALS)} and {p.name} laughed.",
        f"{p.name} felt {rng.choice(FEELINGS)} because the {thing} was {rng.choice(ADJECTIVES)}.",
        f"{p.name} bought a {p.colour} {thing}, because {p.colour} is {p.name}'s favourite colour.",
        f"it started to rain, so {p.name} and {p.pet} went home to {p.city}.",
        f"{p.name} gave the {thing} to {friend.name}, who lives in {friend.city}.",
        f"{friend.name} was {rng.choice(FEELINGS)}, so {p.name} made a cake for {friend.name}.",
    ]
    # a random subset of the events, kept in the order of the list so the plot stays in order
    s += [events[i] for i in sorted(rng.sample(range(len(events)), rng.randint(2, 4)))]
    s.append(rng.choice([f"in the end, {p.name} was {rng.choice(['happy', 'proud'])}.",
                         f"that night, {p.name} and {p.pet} slept well. the end.",
                         f"and {p.name} never forgot that day at the {place}."]))
    return " ".join(s)


# --------------------------------------------------------------------------- fact and reading records

_VALUES = {"colour": COLOURS, "job": JOBS, "kind": ANIMALS}


def _wrong_object(rng: random.Random, world: World, relation: str, obj: str) -> str:
    pool = _VALUES.get(relation) or {
        "capital": list(world.countries.values()), "lives": list(world.countries.values()),
        "pet": [p.pet for p in world.people], "owner": [p.name for p in world.people]}[relation]
    return rng.choice([x for x in pool if x != obj])


def fact_record(rng: random.Random, world: World, fact: tuple[str, str, str]) -> dict:
    relation, subject, obj = fact
    prompt, answer = qa(relation, subject, obj)
    return tasks.record("facts", prompt, answer, _wrong_object(rng, world, relation, obj))


def _fresh_person(rng: random.Random, fresh: NameMaker) -> Person:
    return Person(name=fresh(), city=fresh(), colour=rng.choice(COLOURS), job=rng.choice(JOBS),
                  pet=fresh(), kind=rng.choice(ANIMALS))


def reading_record(rng: random.Random, forbidden: set[str]) -> dict:
    """Answer a question from a context about 2-3 throwaway people (names used nowhere else)."""
    fresh = NameMaker(rng, set(forbidden))      # a copy: throwaway names may repeat across records
    people = [_fresh_person(rng, fresh) for _ in range(rng.randint(2, 3))]
    target = rng.choice(people)
    relation = rng.choice(["lives", "colour", "job", "pet", "owner", "kind"])
    subject, obj = {r: (s, o) for r, s, o in person_facts(target)}[relation]
    prompt, answer = qa(relation, subject, obj)
    other = next(q for q in people if q is not target)
    wrong = {r: o for r, _, o in person_facts(other)}[relation]   # a distractor from the context
    if wrong == obj:
        wrong = fresh()
    context = " ".join(entity_doc(q) for q in people)
    return tasks.record("reading", with_context(context, prompt), answer, wrong)


# --------------------------------------------------------------------------- the corpus

def _kb(rng: random.Random, names: NameMaker, cfg: TinyWorldConfig) -> tuple[World, list[dict], list[dict]]:
    """Knowledge-base entities (never in the pretraining text), their documents and questions."""
    kb = make_world(rng, names, cfg.n_kb_countries, cfg.n_kb_people)
    country_of = {cap: c for c, cap in kb.countries.items()}
    docs, questions = [], []
    for c, cap in kb.countries.items():
        docs.append({"id": f"kb-{len(docs):04d}", "title": c,
                     "text": f"{c} is a country. the capital of {c} is {cap}."})
        prompt, answer = qa("capital", c, cap)
        questions.append({"task": "kb", "prompt": prompt, "answer": answer, "doc_id": docs[-1]["id"]})
    for p in kb.people:
        docs.append({"id": f"kb-{len(docs):04d}", "title": p.name, "text": entity_doc(p, country_of[p.city])})
        for r, s, o in person_facts(p):
            prompt, answer = qa(r, s, o)
            questions.append({"task": "kb", "prompt": prompt, "answer": answer, "doc_id": docs[-1]["id"]})
    return kb, docs, questions


def _probes(make, n: int, tries: int = 50) -> list[dict]:
    """Up to n distinct probes {"task", "prompt", "answer"} drawn from `make()`."""
    out: dict[str, dict] = {}
    for _ in range(n * tries):
        if len(out) >= n:
            break
        r = make()
        out.setdefault(r["prompt"], {"task": r["task"], "prompt": r["prompt"], "answer": r["answer"]})
    return list(out.values())


def generate(cfg: TinyWorldConfig) -> TinyWorldCorpus:
    """Draw the world, the knowledge base, the held-out evaluation sets and `size_mb` of text."""
    if cfg.size_mb <= 0:
        raise ValueError(f"size_mb must be > 0, got {cfg.size_mb}")
    seed = cfg.seed
    wrng = random.Random(f"tinyworld:{seed}:world")
    names = NameMaker(wrng)
    world = make_world(wrng, names, cfg.n_countries, cfg.n_people)
    kb, kb_docs, kb_questions = _kb(random.Random(f"tinyworld:{seed}:kb"), names, cfg)
    forbidden = set(names.taken)                # world + kb names: throwaway names avoid them

    def eval_keep(key: tuple) -> bool:
        # single-digit arithmetic is never held out: it is the times table the steps are made of
        if key[0] == "arith" and max(key[2:]) < 10:
            return False
        return held_out(seed, *key)

    def train_keep(key: tuple) -> bool:
        return not eval_keep(key)

    # evaluation sets: drawn only from held-out keys
    erng = random.Random(f"tinyworld:{seed}:eval")
    facts = world.facts()
    evals = {
        "facts": [{"task": "facts", "prompt": p, "answer": a, "relation": f[0]}
                  for f in facts if eval_keep(("fact", f[0], f[1])) for p, a in [qa(*f)]][: cfg.n_eval],
        "arithmetic": _probes(lambda: tasks.arithmetic(erng, eval_keep, steps=False), cfg.n_eval),
        "arithmetic_steps": _probes(lambda: tasks.arithmetic(erng, eval_keep, steps=True), cfg.n_eval),
        "instructions": [],
        "reading": _probes(lambda: reading_record(erng, forbidden), cfg.n_eval),
    }
    per_task = max(1, cfg.n_eval // len(tasks.INSTRUCTIONS))
    for t in sorted(tasks.INSTRUCTIONS):
        evals["instructions"] += _probes(lambda: tasks.instruction(erng, eval_keep, t), per_task)

    # pretraining documents: the kind furthest below its byte share goes next
    rng = random.Random(f"tinyworld:{seed}:docs")
    train_facts = [f for f in facts if train_keep(("fact", f[0], f[1]))]
    makers = {
        "story": lambda: (story(rng, world), None),
        "biography": lambda: (biography(rng, world), None),
        "facts": lambda: fact_record(rng, world, rng.choice(train_facts)),
        "arithmetic": lambda: tasks.arithmetic(rng, train_keep, steps=False, keep_steps=True),
        "arithmetic_steps": lambda: tasks.arithmetic(rng, train_keep, steps=True, keep_steps=True),
        "instruction": lambda: tasks.instruction(rng, train_keep),
        "reading": lambda: reading_record(rng, forbidden),
    }
    total = sum(cfg.mix.values())
    share = {k: v / total for k, v in cfg.mix.items() if v > 0}
    unknown = set(share) - set(makers)
    if unknown:
        raise ValueError(f"unknown tinyworld mix kinds {sorted(unknown)}; valid: {sorted(makers)}")
    budget = int(cfg.size_mb * 1e6)
    used = dict.fromkeys(share, 0)
    docs, records, n_bytes = [], [], 0
    while n_bytes < budget:
        kind = max(share, key=lambda k: share[k] * (n_bytes + 1) - used[k])
        out = makers[kind]()
        rec = out if isinstance(out, dict) else out[1]
        text = rec["prompt"] + rec["response"] if rec is not None else out[0]
        size = len(text.encode("utf-8")) + 1
        used[kind] += size
        n_bytes += size
        docs.append(text)
        records.append(rec)
    return TinyWorldCorpus(world=world, docs=docs, records=records, evals=evals, kb_docs=kb_docs,
                           kb_questions=kb_questions)
