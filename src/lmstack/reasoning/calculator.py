"""A safe arithmetic evaluator: the calculator tool a model may call.

    evaluate("(47+38)*2")      # 170
    evaluate("7/2")            # 3.5
    run_calculator("1/0")      # CalcResult(value=None, error="division by zero")

The expression is parsed with `ast` and walked by hand: integer and float literals, the binary
operators + - * / // % **, unary minus and plus, and parentheses (which the parser has already
folded into the tree). Everything else (names, calls, attributes, subscripts, comparisons,
strings, lambdas) is refused, so a model can never run code through it; Python's `eval` is
never called. Bounds keep a hostile expression from eating the machine: a cap on its length,
on the tree's size, on exponents and on the size of every intermediate integer.

Errors a model can cause (a malformed expression, division by zero, a result too large)
raise `CalcError`; `run_calculator` turns them into a recorded result the model then sees,
so one bad call fails that call, not the whole batch.
"""
from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass

from lmstack.utils import LmstackError

MAX_EXPR_CHARS = 200        # longer than any arithmetic a tool call needs
MAX_NODES = 100             # operators + operands in the tree
MAX_EXPONENT = 64           # a ** b with |b| above this is refused (2**64 is already 20 digits)
MAX_INT_DIGITS = 100        # any intermediate integer with more digits is refused

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class CalcError(LmstackError, ValueError):
    """The expression is not allowed arithmetic, or its value is undefined or too large."""


def _check_size(x: int | float) -> int | float:
    if isinstance(x, int) and abs(x) >= 10 ** MAX_INT_DIGITS:
        raise CalcError(f"result has more than {MAX_INT_DIGITS} digits")
    if isinstance(x, float) and not math.isfinite(x):
        raise CalcError("result is not a finite number")
    return x


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        # bool is an int subclass: "True" must not slip through as 1
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalcError(f"only numbers are allowed, got {node.value!r}")
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise CalcError("division by zero")
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise CalcError(f"exponent {right} is out of bounds (|exponent| <= {MAX_EXPONENT})")
            if left == 0 and right < 0:
                raise CalcError("division by zero")
            if isinstance(left, (int, float)) and left < 0 and not float(right).is_integer():
                raise CalcError("a negative number to a fractional power is not a real number")
        try:
            return _check_size(_BINARY[type(node.op)](left, right))
        except OverflowError:
            raise CalcError("result is too large") from None
    what = type(node).__name__
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        what = type(node.op).__name__
    raise CalcError(f"{what} is not allowed; use numbers, + - * / // % **, unary minus and parentheses")


def evaluate(expr: str) -> int | float:
    """The value of an arithmetic expression; raises CalcError for anything else."""
    if not isinstance(expr, str):
        raise CalcError(f"expression must be a string, got {type(expr).__name__}")
    if len(expr) > MAX_EXPR_CHARS:
        raise CalcError(f"expression has {len(expr)} characters (at most {MAX_EXPR_CHARS})")
    if not expr.strip():
        raise CalcError("empty expression")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise CalcError(f"malformed expression {expr.strip()!r}") from None
    n_nodes = sum(1 for _ in ast.walk(tree))
    if n_nodes > MAX_NODES:
        raise CalcError(f"expression has {n_nodes} parts (at most {MAX_NODES})")
    return _eval(tree.body)


def format_number(x: int | float) -> str:
    """Integers as integers; a float that is whole as an integer (7/7 -> '1'); else up to 10
    significant digits (repr-free, so the model sees a short stable string)."""
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return str(x) if isinstance(x, int) else f"{x:.10g}"


@dataclass(frozen=True)
class CalcResult:
    expression: str
    value: int | float | None        # None when the call failed
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        """What the model sees after its call: the number, or 'error: <why>'."""
        return format_number(self.value) if self.ok else f"error: {self.error}"


def run_calculator(expr: str) -> CalcResult:
    """One tool call: never raises for a bad expression, records the error instead."""
    try:
        return CalcResult(expr, evaluate(expr))
    except CalcError as e:
        return CalcResult(expr, None, str(e))
