"""One arithmetic problem, three ways to ask it, one way to read the answer.

tinyworld writes every problem in two forms (data/tinyworld_tasks.py): direct,
'Q: what is 47+38?\\nA: 47+38=' -> '85', and with worked steps, 'Q: what is 47+38? show your
work.\\nA:' -> ' 7+8=15, write 5 carry 1. 4+3+1=8, write 8. so 47+38=85'. A third form asks
for the calculator tool (tools.py): 'Q: what is 47+38? use the calculator.\\nA:' ->
' <calc>47+38</calc>=85', where '=85' is written by the tool, not the model.

    p = Problem.parse("Q: what is 47+38?\\nA: 47+38=")      # Problem(47, '+', 38)
    p.prompt("cot"); p.answer                               # '85'
    extract_answer(p.prompt("direct"), "85\\n")              # '85'

The three forms end alike: the first line of prompt + completion ends '=<number>' (a worked
solution ends 'so 47+38=85', a tool call ends '</calc>=85'), so one extractor reads all.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lmstack.tokenizer.tool_calls import CALL_CLOSE, CALL_OPEN
from lmstack.utils import LmstackError

STYLES = ("direct", "cot", "tool")
_PROBLEM = re.compile(r"what is (\d+)\s*([-+*])\s*(\d+)\?")
_FINAL = re.compile(r"=\s*(-?\d+)\s*\.?\s*$")          # '=85' at the end of a line


@dataclass(frozen=True)
class Problem:
    a: int
    op: str          # '+', '-' or '*'
    b: int

    @classmethod
    def parse(cls, prompt: str) -> "Problem":
        """The problem a tinyworld arithmetic prompt (any of the forms) asks about."""
        m = _PROBLEM.search(prompt)
        if m is None:
            raise LmstackError(f"not an arithmetic prompt (expected 'what is A+B?' with +, - or *): {prompt[:80]!r}")
        return cls(int(m.group(1)), m.group(2), int(m.group(3)))

    @property
    def expression(self) -> str:
        return f"{self.a}{self.op}{self.b}"

    @property
    def answer(self) -> str:
        return str({"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op])

    def prompt(self, style: str) -> str:
        """The prompt of one style; 'direct' and 'cot' are byte-equal to tinyworld's."""
        if style == "direct":
            return f"Q: what is {self.expression}?\nA: {self.expression}="
        if style == "cot":
            return f"Q: what is {self.expression}? show your work.\nA:"
        if style == "tool":
            return f"Q: what is {self.expression}? use the calculator.\nA:"
        raise LmstackError(f"unknown style {style!r}; valid: {', '.join(STYLES)}")

    def tool_trace(self) -> str:
        """A training document for the tool form: the call, then the result the tool writes."""
        return f"{self.prompt('tool')} {CALL_OPEN}{self.expression}{CALL_CLOSE}={self.answer}"


def extract_answer(prompt: str, completion: str, complete: bool = True) -> str | None:
    """The final number of an answer: the '=<n>' ending the answer's first line, where the
    answer line starts in the prompt (direct prompts end 'A: 47+38='). None if there is none
    (the model rambled), or if `complete` is False (the token budget ran out) and the line
    never ended: '... 4+3+1=8' cut mid-solution must not read as the answer 8."""
    if not complete and "\n" not in completion:
        return None
    line = (prompt.rsplit("\n", 1)[-1] + completion).split("\n", 1)[0]
    m = _FINAL.search(line.strip())
    return m.group(1) if m else None
