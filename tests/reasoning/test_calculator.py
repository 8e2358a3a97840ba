"""The calculator tool: values against hand-computed ones and against Python's own arithmetic,
and every refusal (names, calls, bounds, division by zero) as a recorded error."""
from __future__ import annotations

import random

import pytest

from lmstack.reasoning.calculator import (MAX_EXPR_CHARS, CalcError, evaluate, format_number, run_calculator)


@pytest.mark.parametrize("expr, value", [
    ("47+38", 85), ("(47+38)*2", 170), ("100-7*3", 79), ("-3**2", -9), ("(-3)**2", 9), ("2**-1", 0.5),
    ("7//2", 3), ("-7//2", -4), ("7%3", 1), ("-7%3", 2), ("7/2", 3.5), ("+5", 5), ("--5", 5),
    ("((1))", 1), (" 2 * ( 3 + 4 ) ", 14), ("1.5*4", 6.0), ("2**10", 1024),
])
def test_hand_computed_values(expr, value):
    got = evaluate(expr)
    assert got == value and type(got) is type(value)


def test_agrees_with_python_arithmetic_on_random_expressions():
    # reference: Python's evaluation of expressions this test itself generates (trusted input)
    rng = random.Random(0)

    def expr(depth: int) -> str:
        if depth == 0 or rng.random() < 0.3:
            return str(rng.randint(0, 50))
        op = rng.choice(["+", "-", "*", "//", "%", "/"])
        e = f"({expr(depth - 1)}{op}{expr(depth - 1)})"
        return f"-{e}" if rng.random() < 0.2 else e

    checked = 0
    for _ in range(300):
        e = expr(4)
        try:
            want = eval(e, {"__builtins__": {}})  # noqa: S307 - the reference, on generated input
        except ZeroDivisionError:
            with pytest.raises(CalcError, match="division by zero"):
                evaluate(e)
            continue
        assert evaluate(e) == pytest.approx(want, rel=1e-12), e
        checked += 1
    assert checked > 200


@pytest.mark.parametrize("expr, why", [
    ("__import__('os')", "Call"), ("x+1", "Name"), ("abs(-1)", "Call"), ("(1).real", "Attribute"),
    ("[1, 2]", "List"), ("1 if 1 else 2", "IfExp"), ("'a'*3", "only numbers"), ("True+1", "only numbers"),
    ("1<2", "Compare"), ("lambda: 1", "Lambda"), ("1 & 2", "BitAnd"), ("~1", "Invert"), ("1e400*10", "finite"),
    ("1/0", "division by zero"), ("5//0", "division by zero"), ("5%0", "division by zero"),
    ("0**-1", "division by zero"), ("2**65", "exponent"), ("(10**60)*(10**60)", "digits"),
    ("(-8)**0.5", "real number"), ("", "empty"), ("1+", "malformed"), ("2+3)", "malformed"),
    ("1;2", "malformed"), ("+".join(["1"] * 60), "parts"),
])
def test_refusals_name_the_reason(expr, why):
    with pytest.raises(CalcError, match=why):
        evaluate(expr)


def test_length_bound_and_non_string():
    with pytest.raises(CalcError, match=f"at most {MAX_EXPR_CHARS}"):
        evaluate("1" * (MAX_EXPR_CHARS + 1))
    with pytest.raises(CalcError, match="must be a string"):
        evaluate(12)


def test_run_calculator_records_errors_instead_of_raising():
    ok, bad, broken = run_calculator("6/3"), run_calculator("1/0"), run_calculator("2*(3")
    assert ok.ok and ok.value == 2.0 and ok.text == "2"
    assert not bad.ok and bad.value is None and bad.text == "error: division by zero"
    assert not broken.ok and broken.text.startswith("error: malformed expression")


def test_format_number():
    assert [format_number(x) for x in (85, 3.5, 2.0, -4, 1 / 3)] == ["85", "3.5", "2", "-4", "0.3333333333"]
