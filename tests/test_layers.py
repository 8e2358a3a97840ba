"""Imports point down the floors of ../shared/DESIGN.md and never back up; folders on one floor
import each other only where the design lists the arrow. Checked statically over every import in
src/lmstack, the lazy ones inside functions included (a lazy import is still a dependency)."""
from __future__ import annotations

import ast
from pathlib import Path

FLOORS = {
    "utils": 0, "kernels": 0,
    "model": 1, "tokenizer": 1,
    "infer": 2, "data": 2, "report": 2,
    "train": 3, "quant": 3, "finetune": 3,
    "align": 4, "eval": 4, "serve": 4,
    "labs": 5, "rag": 5, "reasoning": 5,
    "pipeline": 6,
    "cli": 7,
}
# The arrows within one floor that the design names (importer, imported).
SAME_FLOOR = {("finetune", "train"), ("finetune", "quant"), ("align", "finetune"), ("kernels", "utils")}
SRC = Path(__file__).resolve().parents[1] / "src" / "lmstack"


def imported_packages(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "lmstack" and len(parts) > 1:
                yield node.lineno, parts[1]


def test_every_package_has_a_floor():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(FLOORS), f"give these a floor: {sorted(packages ^ set(FLOORS))}"


def test_imports_point_down():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if len(rel.parts) < 2:
            continue
        src = rel.parts[0]
        for line, dst in imported_packages(path):
            if dst == src or dst not in FLOORS:
                continue
            up = FLOORS[dst] > FLOORS[src]
            across = FLOORS[dst] == FLOORS[src] and (src, dst) not in SAME_FLOOR
            if up or across:
                wrong.append(f"{rel}:{line}: {src} (floor {FLOORS[src]}) imports lmstack.{dst} "
                             f"(floor {FLOORS[dst]})")
    assert not wrong, "imports that point up or across a floor:\n" + "\n".join(wrong)
