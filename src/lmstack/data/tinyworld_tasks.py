"""tinyworld task records: arithmetic (direct and with worked steps) and instruction tasks.

Every record is a dict {"task", "prompt", "response", "answer", "rejected"} with one layout:
  * `prompt` never ends with a space; `response` is " " + the answer line (just the answer
    after an "=" that ends an arithmetic prompt), `rejected` the same for a plausible wrong
    answer (preference pairs);
  * `answer == response.strip()`: the exact first line a model should produce;
  * the pretraining document for a record is `prompt + response`.
So an evaluation probe is a record's prompt, and exact match is
`completion.split("\n")[0].strip() == answer`.

Each generator takes `keep(key) -> bool`, which rejects inputs reserved for evaluation:
training draws inputs with `keep = not held_out`, evaluation draws with `keep = held_out`.
"""
from __future__ import annotations

import random
import re
from typing import Callable

from lmstack.data.tinyworld_world import ANIMALS, COLOURS, JOBS

Keep = Callable[[tuple], bool]

WORDS = sorted(set(
    ["market", "park", "river", "hill", "forest", "school", "garden", "beach", "farm", "shop",
     "ball", "hat", "kite", "box", "cup", "book", "boat", "drum", "cake", "apple", "lamp", "bell",
     "happy", "sad", "tired", "proud", "big", "small", "old", "new", "soft", "warm", "cold",
     "sun", "moon", "star", "tree", "rain", "snow", "bread", "milk", "home", "door", "road"]
    + COLOURS + JOBS + ANIMALS))


def record(task: str, prompt: str, answer: str, rejected: str, sep: str = " ") -> dict:
    """`sep` joins prompt and answer: " " after "A:", "" after an "=" that ends the prompt."""
    assert answer != rejected and "\n" not in answer, (task, answer, rejected)
    return {"task": task, "prompt": prompt, "response": sep + answer, "answer": answer,
            "rejected": sep + rejected}


def _draw(rng: random.Random, keep: Keep, make: Callable[[], tuple]) -> tuple:
    """Draw inputs until `keep` accepts one (the eval share is ~20%, so a few tries suffice)."""
    for _ in range(10_000):
        key = make()
        if keep(key):
            return key
    raise RuntimeError("tinyworld: could not draw an input outside the held-out set")


# --------------------------------------------------------------------------- arithmetic

def _operand(rng: random.Random, max_digits: int) -> int:
    # favour 2-digit numbers: small models learn short sums first;
    # 3 digits stay rarer (1 in 5) so the longer carries are seen but do not dominate
    digits = rng.choice({1: (1,), 2: (1, 2, 2), 3: (1, 2, 2, 2, 3)}[max_digits])
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _add_steps(a: int, b: int) -> str:
    """Column addition, right to left: '7+8=15, write 5 carry 1. 4+3+1=8, write 8. so 47+38=85'."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        expr = f"{x}+{y}" + (f"+{carry}" if carry else "")
        carry = s // 10
        last = i == max(len(da), len(db)) - 1
        steps.append(f"{expr}={s}, write {s if last else s % 10}" + (f" carry {carry}" if carry and not last else ""))
    return ". ".join(steps) + f". so {a}+{b}={a + b}"


def _sub_steps(a: int, b: int) -> str:
    """Column subtraction with borrows: '3-7 needs a borrow, 13-7=6, write 6. 8-1-4=3, ...'."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, borrow = [], 0
    for i in range(len(da)):
        x, y = int(da[i]), int(db[i]) if i < len(db) else 0
        top = f"{x}-{borrow}" if borrow else f"{x}"
        x -= borrow
        if x < y:
            steps.append(f"{top}-{y} needs a borrow, {x + 10}-{y}={x + 10 - y}, write {x + 10 - y}")
            borrow = 1
        else:
            steps.append(f"{top}-{y}={x - y}, write {x - y}")
            borrow = 0
    return ". ".join(steps) + f". so {a}-{b}={a - b}"


def _places(n: int) -> list[int]:
    """Non-zero place values of n, largest first: 405 -> [400, 5]."""
    return [int(d) * 10 ** i for i, d in reversed(list(enumerate(str(n)[::-1]))) if d != "0"]


def _mul_steps(a: int, b: int) -> str:
    """Partial products by place value: '23*40=920. 23*5=115. 920+115=1035. so 23*45=1035'."""
    if len(_places(b)) > 1:
        prods = [(f"{a}*{p}", a * p) for p in _places(b)]
    elif len(_places(a)) > 1:
        prods = [(f"{p}*{b}", p * b) for p in _places(a)]
    else:
        return f"so {a}*{b}={a * b}"
    steps = [f"{e}={v}" for e, v in prods] + ["+".join(str(v) for _, v in prods) + f"={a * b}"]
    return ". ".join(steps) + f". so {a}*{b}={a * b}"


def arith_key(rng: random.Random) -> tuple:
    op = rng.choice("++--*")
    if op == "*":
        a, b = _operand(rng, 2), _operand(rng, rng.choice((1, 1, 2)))
    else:
        a, b = _operand(rng, 3), _operand(rng, 3)
        if op == "-" and a < b:
            a, b = b, a
    # + and * commute: hold out the unordered pair so b+a cannot leak a held-out a+b
    return ("arith", op, *sorted((a, b))) if op in "+*" else ("arith", op, a, b)


def _wrong_number(rng: random.Random, n: int) -> int:
    w = n + rng.choice([-10, -2, -1, 1, 2, 10])
    return w if w >= 0 and w != n else n + 1


_BINARY = re.compile(r"(?<![\d+*-])(\d+)([-+*])(\d+)=")     # "a op b=" not inside a longer chain
_STEPS = {"+": _add_steps, "-": _sub_steps, "*": _mul_steps}


def sub_keys(work: str) -> list[tuple]:
    """Keys of the two-operand problems written out inside worked steps ('23*40=920' -> 23*40)."""
    keys = []
    for a, op, b in _BINARY.findall(work):
        a, b = int(a), int(b)
        keys.append(("arith", op, *sorted((a, b))) if op in "+*" else ("arith", op, a, b))
    return keys


def arithmetic(rng: random.Random, keep: Keep, steps: bool, keep_steps: bool = False) -> dict:
    """'Q: what is 47+38?\\nA: 47+38=85' (direct) or '... show your work.\\nA: <steps>' (steps).

    `keep_steps`: also reject a problem whose worked steps write out a rejected problem
    (training must not show '23*40=920' when 23*40 is an evaluation probe)."""
    for _ in range(10_000):
        key = arith_key(rng)
        _, op, a, b = key
        if op in "+*" and rng.random() < 0.5:
            a, b = b, a
        work = _STEPS[op](a, b)
        if keep(key) and (not keep_steps or all(keep(k) for k in sub_keys(work))):
            break
    else:
        raise RuntimeError("tinyworld: could not draw an arithmetic problem outside the held-out set")
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    wrong = _wrong_number(rng, result)
    if not steps:
        return record("arithmetic", f"Q: what is {a}{op}{b}?\nA: {a}{op}{b}=", str(result), str(wrong),
                      sep="")
    bad = work[: work.rindex("=") + 1] + str(wrong)
    return record("arithmetic_steps", f"Q: what is {a}{op}{b}? show your work.\nA:", work, bad)


# --------------------------------------------------------------------------- instructions

def _sentence(rng: random.Random) -> tuple:
    return tuple(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))


def _near_miss(rng: random.Random, items: list[str]) -> list[str]:
    """A wrong version of a list: two neighbours swapped (or one item dropped)."""
    items = list(items)
    if len(items) >= 2 and len(set(items)) > 1:
        while True:
            i = rng.randrange(len(items) - 1)
            if items[i] != items[i + 1]:
                items[i], items[i + 1] = items[i + 1], items[i]
                return items
    return items[:-1] if len(items) > 1 else items + items


def _reverse(rng, keep):
    _, w = _draw(rng, keep, lambda: ("reverse", rng.choice(WORDS)))
    wrong = "".join(_near_miss(rng, list(w[::-1]))) if len(set(w)) > 1 else w + w[0]
    return record("reverse", f"Q: reverse the word {w}.\nA:", w[::-1], wrong if wrong != w[::-1] else w)


def _spell(rng, keep):
    _, w = _draw(rng, keep, lambda: ("spell", rng.choice(WORDS)))
    return record("spell", f"Q: spell the word {w}.\nA:", " ".join(w), " ".join(_near_miss(rng, list(w))))


def _upper(rng, keep):
    _, w = _draw(rng, keep, lambda: ("upper", rng.choice(WORDS)))
    return record("upper", f"Q: write {w} in capital letters.\nA:", w.upper(), w[0].upper() + w[1:])


def _repeat(rng, keep):
    _, w, n = _draw(rng, keep, lambda: ("repeat", rng.choice(WORDS), rng.randint(2, 5)))
    return record("repeat", f"Q: repeat {w} {n} times.\nA:", " ".join([w] * n), " ".join([w] * (n + 1)))


def _count(rng, keep):
    def make():
        w = rng.choice(WORDS)
        return ("count", w, rng.choice(w) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz"))
    _, w, c = _draw(rng, keep, make)
    n = w.count(c)
    return record("count", f"Q: how many times does the letter {c} appear in {w}?\nA:", str(n),
                  str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1))


def _sort(rng, keep):
    _, *nums = _draw(rng, keep, lambda: ("sort", *(rng.randint(0, 99) for _ in range(rng.randint(3, 5)))))
    good = sorted(nums)
    bad = _near_miss(rng, [str(x) for x in good])
    if bad == [str(x) for x in good]:
        bad = bad + bad[-1:]
    return record("sort", f"Q: sort {' '.join(map(str, nums))}.\nA:", " ".join(map(str, good)), " ".join(bad))


def _first_word(rng, keep):
    _, *s = _draw(rng, keep, lambda: ("first_word", *_sentence(rng)))
    other = next((x for x in s[1:] if x != s[0]), "the")
    return record("first_word", f"Q: what is the first word of \"{' '.join(s)}\"?\nA:", s[0], other)


def _last_word(rng, keep):
    _, *s = _draw(rng, keep, lambda: ("last_word", *_sentence(rng)))
    other = next((x for x in s[-2::-1] if x != s[-1]), "the")
    return record("last_word", f"Q: what is the last word of \"{' '.join(s)}\"?\nA:", s[-1], other)


def _word_count(rng, keep):
    _, *s = _draw(rng, keep, lambda: ("word_count", *_sentence(rng)))
    return record("word_count", f"Q: how many words are in \"{' '.join(s)}\"?\nA:", str(len(s)),
                  str(len(s) + rng.choice((-1, 1))))


INSTRUCTIONS = {"reverse": _reverse, "spell": _spell, "upper": _upper, "repeat": _repeat,
                "count": _count, "sort": _sort, "first_word": _first_word, "last_word": _last_word,
                "word_count": _word_count}


def instruction(rng: random.Random, keep: Keep, task: str | None = None) -> dict:
    """One instruction/response record of `task` (a random task when None)."""
    return INSTRUCTIONS[task or rng.choice(sorted(INSTRUCTIONS))](rng, keep)
