"""The invented world behind tinyworld: entities, their facts, and the sentences that state them.

The world is fixed by the seed alone (never by the corpus size), so every document, every
task record and every evaluation probe built from one seed agrees on every fact. Facts are
triples (relation, subject, object): the capital of a country, where a person lives, their
favourite colour, their job, their pet, the pet's owner and kind.

Two renderings per fact:
  * declarative sentences, several phrasings each, used in biographies and stories;
  * a question form `Q: <question>\nA: <answer prefix> <object>`; the answer prefix repeats
    the question as a statement ("the capital of Velmora is"), so the probe prompt ends right
    before the object and a model that memorised the declarative sentence can complete it.
Everything is lowercase except names, to keep the vocabulary small.
"""
from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass, field

COLOURS = ["red", "blue", "green", "yellow", "pink", "brown", "white", "black"]
JOBS = ["baker", "farmer", "teacher", "sailor", "painter", "doctor", "singer", "builder"]
ANIMALS = ["cat", "dog", "fox", "bat", "frog", "goat", "duck", "horse"]

_ONSETS = list("bdfgklmnprstvz")
_VOWELS = list("aeiou")
_CODAS = ["", "", "n", "r", "l"]

# relation -> (question, answer prefix); "{s}" is the subject. The probe prompt is
# f"Q: {question}\nA: {prefix}" and the answer is the object.
QUESTIONS = {
    "capital": ("what is the capital of {s}?", "the capital of {s} is"),
    "lives": ("where does {s} live?", "{s} lives in"),
    "colour": ("what is {s}'s favourite colour?", "{s}'s favourite colour is"),
    "job": ("what is {s}'s job?", "{s} is a"),
    "pet": ("what is the name of {s}'s pet?", "{s}'s pet is called"),
    "owner": ("who owns {s}?", "{s} is owned by"),
    "kind": ("what kind of animal is {s}?", "{s} is a"),
}

# relation -> declarative phrasings; "{s}" subject, "{o}" object. The first one is the
# answer-prefix form, so the statement a probe asks for appears verbatim in training text;
# no other phrasing starts with that prefix ("X is a small fox" would teach "X is a" -> "small").
PHRASINGS = {
    "capital": ["the capital of {s} is {o}.", "{o} is the capital of {s}.",
                "{s} has its capital at {o}.", "the biggest city in {s} is its capital, {o}."],
    "lives": ["{s} lives in {o}.", "{s} has a home in {o}.", "{s}'s home is in the city of {o}.",
              "{o} is where {s} lives."],
    "colour": ["{s}'s favourite colour is {o}.", "{s} likes {o} more than any other colour.",
               "the colour {s} loves most is {o}.", "{s} always wears {o}, the colour {s} likes best."],
    "job": ["{s} is a {o}.", "{s} works as a {o}.", "by day, {s} works as a {o}.",
            "everyone in town knows {s} the {o}."],
    "pet": ["{s}'s pet is called {o}.", "{s} has a pet called {o}.", "{o} is the pet of {s}."],
    "owner": ["{s} is owned by {o}.", "{o} owns {s}.", "{s} belongs to {o}."],
    "kind": ["{s} is a {o}.", "the animal called {s} is a {o}.", "{s} the {o} is well known in town."],
}


@functools.lru_cache(maxsize=1 << 20)      # the same small keys are asked about again and again
def held_out(seed: int, *key: object, rate: float = 0.2) -> bool:
    """Deterministic coin for "this item is reserved for evaluation" (same seed, same answer)."""
    h = hashlib.blake2b(repr((seed, key)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < rate


def qa(relation: str, subject: str, obj: str) -> tuple[str, str]:
    """(probe prompt, answer) for one fact: prompt ends right before ' ' + answer."""
    question, prefix = QUESTIONS[relation]
    return f"Q: {question.format(s=subject)}\nA: {prefix.format(s=subject)}", obj


def state(rng: random.Random, relation: str, subject: str, obj: str) -> str:
    """One declarative sentence for a fact, in a random phrasing."""
    return rng.choice(PHRASINGS[relation]).format(s=subject, o=obj)


class NameMaker:
    """Unique invented names from syllables (e.g. 'Bolo', 'Tinar'); never a repeat."""

    def __init__(self, rng: random.Random, taken: set[str] | None = None):
        self.rng = rng
        self.taken = taken if taken is not None else set()

    def __call__(self) -> str:
        while True:
            n = self.rng.choice((2, 2, 2, 3))
            name = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                           for _ in range(n)).capitalize()
            if name not in self.taken and 4 <= len(name) <= 9:
                self.taken.add(name)
                return name


@dataclass
class Person:
    name: str
    city: str
    colour: str
    job: str
    pet: str
    kind: str


@dataclass
class World:
    """Countries with capitals, and people who live in those capitals with one pet each."""
    countries: dict[str, str] = field(default_factory=dict)   # country -> capital
    people: list[Person] = field(default_factory=list)

    def facts(self) -> list[tuple[str, str, str]]:
        """Every (relation, subject, object) triple of the world, in a fixed order."""
        out = [("capital", c, cap) for c, cap in self.countries.items()]
        for p in self.people:
            out += person_facts(p)
        return out

    def names(self) -> set[str]:
        return set(self.countries) | set(self.countries.values()) | {p.name for p in self.people} | \
            {p.pet for p in self.people}

    def residents(self, city: str) -> list[str]:
        return [p.name for p in self.people if p.city == city]


def make_world(rng: random.Random, names: NameMaker, n_countries: int, n_people: int) -> World:
    w = World()
    for _ in range(n_countries):
        w.countries[names()] = names()
    cities = list(w.countries.values())
    for _ in range(n_people):
        w.people.append(Person(name=names(), city=rng.choice(cities), colour=rng.choice(COLOURS),
                               job=rng.choice(JOBS), pet=names(), kind=rng.choice(ANIMALS)))
    return w


def person_facts(p: Person) -> list[tuple[str, str, str]]:
    return [("lives", p.name, p.city), ("colour", p.name, p.colour), ("job", p.name, p.job),
            ("pet", p.name, p.pet), ("owner", p.pet, p.name), ("kind", p.pet, p.kind)]


def biography(rng: random.Random, world: World) -> str:
    """A short document stating facts about one person or one country, in random phrasings."""
    if rng.random() < 0.2:
        country = rng.choice(list(world.countries))
        cap = world.countries[country]
        sents = [f"{country} is a country.", state(rng, "capital", country, cap)]
        res = world.residents(cap)
        if res:
            sents += [state(rng, "lives", r, cap) for r in rng.sample(res, min(3, len(res)))]
        return " ".join(sents)
    p = rng.choice(world.people)
    facts = person_facts(p)
    rng.shuffle(facts)
    return " ".join(state(rng, *f) for f in facts[: rng.randint(3, len(facts))])


def entity_doc(p: Person, country: str | None = None) -> str:
    """The fixed, complete description of one person, used for knowledge-base documents and
    reading-comprehension contexts (first phrasing of each fact)."""
    sents = [PHRASINGS[r][0].format(s=s, o=o) for r, s, o in person_facts(p)]
    if country is not None:
        sents.append(PHRASINGS["capital"][0].format(s=country, o=p.city))
    return " ".join(sents)
