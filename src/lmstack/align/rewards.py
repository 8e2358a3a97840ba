"""Verifiable rewards for GRPO: plain functions `(prompt, completion, **fields) -> float`.

    exact_answer("Q: what is 2+3?\\nA: 2+3=", "5\\n", answer="5")    # 1.0
    integer_format("...", "5")                                       # 1.0: the first line is a number
    final_answer("Q: what is 2+3? show your work.\\nA:", " so 2+3=5", answer="5")   # 1.0: the conclusion

A user passes their own functions the same way (`--rewards mymod:myfn` on the CLI). The
completion is the engine's text (stop strings and special tokens removed); tinyworld's rule
for an answer is the completion's first line, stripped (data/tinyworld_tasks.py).
"""
from __future__ import annotations

import importlib
import re

from lmstack.utils import LmstackError

_INT = re.compile(r"-?\d+")


def first_line(completion: str) -> str:
    return completion.split("\n", 1)[0].strip()


def exact_answer(prompt: str, completion: str, answer: str = None, **fields) -> float:
    """1.0 when the completion's first line is exactly the record's answer, else 0.0."""
    if answer is None:
        raise LmstackError("exact_answer needs an \"answer\" field in every prompt record")
    return 1.0 if first_line(completion) == str(answer).strip() else 0.0


_FINAL = re.compile(r"\bso [^=]*=\s*(-?\d+)\s*\.?\s*$")     # '... so 47+38=85' ending the line


def final_answer(prompt: str, completion: str, answer: str = None, **fields) -> float:
    """1.0 when the completion's first line is a worked solution ending 'so <problem>=<answer>'
    (tinyworld's arithmetic_steps: '7+8=15, write 5 carry 1. 4+3+1=8, write 8. so 47+38=85'),
    else 0.0. An intermediate step ('4+3+1=8') is never read as the answer: the line must end
    with the 'so ...=' conclusion."""
    if answer is None:
        raise LmstackError("final_answer needs an \"answer\" field in every prompt record")
    m = _FINAL.search(first_line(completion))
    return 1.0 if m is not None and m.group(1) == str(answer).strip() else 0.0


def integer_format(prompt: str, completion: str, **fields) -> float:
    """1.0 when the completion's first line is an integer and nothing else (a format reward)."""
    return 1.0 if _INT.fullmatch(first_line(completion)) else 0.0


BUILTIN = {"exact_answer": exact_answer, "final_answer": final_answer, "integer_format": integer_format}


def resolve_reward(spec: str):
    """A built-in name, or "module:function" importable from the current environment."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise LmstackError(f"unknown reward {spec!r}; use one of {sorted(BUILTIN)} or module:function")
    mod, _, fn = spec.partition(":")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise LmstackError(f"cannot load reward function {spec!r}: {e}") from None
    if not callable(f):
        raise LmstackError(f"reward {spec!r} is not callable")
    return f
