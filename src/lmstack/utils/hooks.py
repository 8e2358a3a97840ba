"""A group of PyTorch hook handles removed together (a lesion's hooks, a pruning mask's)."""
from __future__ import annotations


class HookHandles:
    """The handles some function installed; `remove()` takes them all out (idempotent)."""

    def __init__(self, handles: list):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
