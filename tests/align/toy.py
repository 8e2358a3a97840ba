"""Toy data for the alignment tests: prompts of random words whose preferred answer is fixed."""
from __future__ import annotations

import random

WORDS = ["cat", "dog", "fox", "the", "quick", "brown", "lazy", "over", "yes", "no", "maybe"]


def word_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        out.add("Q: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) + "?\nA:")
    return sorted(out)


def yes_no_pairs(n: int, seed: int, chosen: str = " yes", rejected: str = " no") -> list[dict]:
    return [{"prompt": p, "chosen": chosen, "rejected": rejected} for p in word_prompts(n, seed)]
