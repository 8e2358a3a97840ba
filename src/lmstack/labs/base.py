"""What a lab is given and what it hands back.

A lab is one function, `run(ctx: LabContext) -> LabResult`, in its own module. It composes
library pieces (tokenizer, data, model, Trainer, engine), measures, and draws; the runner
(runner.py) writes what it returns: `numbers.json`, one file per figure and `index.html`.

The insight is not a caption written in advance. A lab states the claim it expects and a
condition on its own numbers; `Insight.sentence` says the claim only when the condition
holds, and says the numbers contradict it otherwise (a quick run on a noisy machine may).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class Figure:
    """One figure: a PNG (`png` bytes) or a self-contained interactive page (`html`)."""
    name: str                    # file stem: NAME.png or NAME.html
    caption: str
    png: bytes | None = None
    html: str | None = None

    def __post_init__(self) -> None:
        if (self.png is None) == (self.html is None):
            raise ValueError(f"figure {self.name!r}: give exactly one of png= or html=")

    @property
    def filename(self) -> str:
        return f"{self.name}.png" if self.png is not None else f"{self.name}.html"


@dataclass
class Insight:
    """The one-sentence claim a lab expects, whether its numbers bear it out, and the numbers."""
    claim: str                   # what the lab expects to show, as a sentence
    holds: bool                  # computed from the numbers
    evidence: str                # the numbers behind the verdict, as a clause

    @property
    def sentence(self) -> str:
        if self.holds:
            return f"{self.claim.rstrip('.')}: {self.evidence}."
        return (f"The numbers do NOT support the expected insight (\"{self.claim.rstrip('.')}\"): "
                f"{self.evidence}.")

    def to_dict(self) -> dict:
        return {"claim": self.claim, "holds": bool(self.holds), "evidence": self.evidence,
                "sentence": self.sentence}


@dataclass
class LabResult:
    built: list[str]             # what the lab built and ran, one line each
    numbers: dict[str, Any]      # JSON-able: the measurements the page and the tests read
    figures: list[Figure]
    insight: Insight
    notes: list[str] = field(default_factory=list)   # substitutions, caveats, what is approximate


@dataclass
class LabContext:
    """How a lab should run: quick (seconds, for tests) or full (minutes), its seed, a scratch
    folder for training runs (deleted afterwards), and where progress lines go."""
    quick: bool
    seed: int
    work: Path
    log: Callable[[str], None] = lambda line: None

    def pick(self, quick: Any, full: Any) -> Any:
        """`quick` in --quick mode, else `full` (step counts, sizes, repeats)."""
        return quick if self.quick else full
