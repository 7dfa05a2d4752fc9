"""Binary arithmetic expression trees shared by the synthetic tasks: build, print, evaluate, explain.

Values are exact (`fractions.Fraction`), so a division is never rounded. Printing uses the fewest
parentheses that keep the tree's meaning under the usual precedence, so `str(parse(text))` is the
canonical form of `text`. Deliberately left out: unary minus, powers and any operator beyond + - * /.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from fractions import Fraction
from typing import Union

PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


@dataclass(frozen=True)
class BinOp:
    op: str
    left: "Expr"
    right: "Expr"


Expr = Union[int, BinOp]


def apply(op: str, a: Fraction, b: Fraction) -> Fraction:
    """ZeroDivisionError on a division by zero."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b


def evaluate(node: Expr) -> Fraction:
    if isinstance(node, int):
        return Fraction(node)
    return apply(node.op, evaluate(node.left), evaluate(node.right))


def to_text(node: Expr) -> str:
    if isinstance(node, int):
        return str(node)
    left, right = to_text(node.left), to_text(node.right)
    if isinstance(node.left, BinOp) and PRECEDENCE[node.left.op] < PRECEDENCE[node.op]:
        left = f"({left})"
    # The right operand also needs brackets at equal precedence under - and /: a - (b + c) != a - b + c.
    if isinstance(node.right, BinOp) and (PRECEDENCE[node.right.op] < PRECEDENCE[node.op]
                                          or (PRECEDENCE[node.right.op] == PRECEDENCE[node.op]
                                              and node.op in "-/")):
        right = f"({right})"
    return f"{left} {node.op} {right}"


def parse(text: str) -> Expr:
    """The tree of an expression over non-negative integers and + - * / with parentheses."""
    def build(node: ast.AST) -> Expr:
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            return BinOp(_AST_OPS[type(node.op)], build(node.left), build(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
            return node.value
        raise ValueError(f"not an integer + - * / expression: {text!r}")

    return build(ast.parse(text, mode="eval").body)


def number_text(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def steps(node: Expr) -> list[tuple[str, str, str, Fraction]]:
    """(left, op, right, value) for each operation, innermost first: the order one works it by hand."""
    out: list[tuple[str, str, str, Fraction]] = []

    def walk(n: Expr) -> Fraction:
        if isinstance(n, int):
            return Fraction(n)
        a, b = walk(n.left), walk(n.right)
        value = apply(n.op, a, b)
        out.append((number_text(a), n.op, number_text(b), value))
        return value

    walk(node)
    return out



def random_tree(rng, numbers: list[int], ops: str) -> Expr:
    """A uniformly split random binary tree whose leaves are `numbers` in order, operators from `ops`."""
    if len(numbers) == 1:
        return numbers[0]
    cut = rng.randint(1, len(numbers) - 1)
    return BinOp(rng.choice(ops), random_tree(rng, numbers[:cut], ops), random_tree(rng, numbers[cut:], ops))
