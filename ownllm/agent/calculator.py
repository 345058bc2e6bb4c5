"""The `calculator` tool: exact arithmetic parsed with the AST, never `eval`.

Where it sits: a built-in tool of the agent (agent/tools.py). Integers are exact at any size up
to a bound, decimals and fractions are exact rationals (0.1 + 0.2 = 0.3), and comparisons give
true/false. Accepted: numbers, + - * / // % **, unary + -, parentheses, < <= > >= == !=, and
the symbols people type: × ÷ − ^ and full-width parentheses (thousands separators like 1,234 are
not: a comma would be ambiguous). Anything else (names, calls, attributes, strings) is a clear error.
Exponents and results are bounded so a request cannot exhaust memory or time.
"""
from __future__ import annotations

import ast
import math
import operator
from decimal import Decimal, localcontext
from fractions import Fraction

MAX_EXPONENT = 10_000          # |b| in a ** b
MAX_DIGITS = 4_000             # digits of any integer / numerator / denominator (Python prints <= 4,300)
MAX_LENGTH = 2_000             # characters of the expression
MAX_DEPTH = 100                # nesting of the parsed expression: the evaluator recurses on it


class CalculatorError(ValueError):
    pass


_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_CMP = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
        ast.Eq: operator.eq, ast.NotEq: operator.ne}


def _digits(n: int) -> float:
    return abs(n).bit_length() * 0.30103  # log10(2): digits without converting to text


def _check_size(x: Fraction) -> Fraction:
    if max(_digits(x.numerator), _digits(x.denominator)) > MAX_DIGITS:
        raise CalculatorError(f"result too large (more than {MAX_DIGITS} digits)")
    return x


def _depth(tree: ast.AST) -> int:
    """Depth of the syntax tree, walked without recursion (a chain of 1,000 `+` is 1,000 deep)."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((child, d + 1) for child in ast.iter_child_nodes(node))
    return deepest


def _eval(node: ast.AST):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalculatorError(f"unsupported value {node.value!r}: only numbers")
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise CalculatorError("number too large (a decimal literal beyond about 1e308)")
        # floats come from decimal literals: take their exact decimal text, not the binary float
        return _check_size(Fraction(node.value) if isinstance(node.value, int) else Fraction(Decimal(repr(node.value))))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand)
        return v if isinstance(node.op, ast.UAdd) else -v
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if b.denominator != 1:
                raise CalculatorError("only whole-number exponents are supported")
            if abs(b) > MAX_EXPONENT:
                raise CalculatorError(f"exponent {b} is too large (limit {MAX_EXPONENT})")
            if a == 0 and b < 0:
                raise CalculatorError("division by zero")
            # bound the result before computing it: digits ≈ |b| · log10|a|
            if abs(b) * max(_digits(a.numerator), _digits(a.denominator)) > MAX_DIGITS * 1.05:
                raise CalculatorError(f"result too large (more than {MAX_DIGITS} digits)")
            return _check_size(a ** int(b))
        op = _BIN.get(type(node.op))
        if op is None:
            raise CalculatorError(f"unsupported operator {type(node.op).__name__}")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise CalculatorError("division by zero")
        return _check_size(Fraction(op(a, b)))
    if isinstance(node, ast.Compare):
        left, result = _eval(node.left), True
        for op, comp in zip(node.ops, node.comparators):
            if type(op) not in _CMP:
                raise CalculatorError(f"unsupported comparison {type(op).__name__}")
            right = _eval(comp)
            result = result and _CMP[type(op)](left, right)
            left = right
        return bool(result)
    raise CalculatorError(f"unsupported syntax: {type(node).__name__} (only numbers, + - * / // % **, "
                          "parentheses and comparisons)")


def format_number(x: Fraction) -> str:
    """Integers as integers; terminating fractions as exact decimals; others as p/q with a rounded value."""
    if x.denominator == 1:
        return str(x.numerator)
    d, twos, fives = x.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    places = max(twos, fives)
    if d == 1 and places + _digits(x.numerator) <= MAX_DIGITS:
        s = str(abs(x.numerator) * 10 ** places // x.denominator).rjust(places + 1, "0")
        return ("-" if x < 0 else "") + s[:-places] + "." + s[-places:]
    with localcontext() as ctx:  # a float would overflow past 1e308 or vanish below 1e-308
        ctx.prec = 12
        approx = format(Decimal(x.numerator) / Decimal(x.denominator), ".10g")
    return f"{x.numerator}/{x.denominator} (≈ {approx})"


def calculate(expression: str) -> str:
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("expression must be a non-empty string")
    if len(expression) > MAX_LENGTH:
        raise CalculatorError(f"expression longer than {MAX_LENGTH} characters")
    text = (expression.replace("×", "*").replace("÷", "/").replace("−", "-").replace("^", "**")
            .replace("（", "(").replace("）", ")"))
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"cannot parse {expression!r}: {e.msg}") from None
    except (RecursionError, MemoryError):
        raise CalculatorError(f"expression nested too deeply (limit {MAX_DEPTH})") from None
    if _depth(tree) > MAX_DEPTH:
        raise CalculatorError(f"expression nested too deeply (limit {MAX_DEPTH} levels)")
    value = _eval(tree)
    return ("true" if value else "false") if isinstance(value, bool) else format_number(value)
