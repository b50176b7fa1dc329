"""Safe arithmetic expressions: a bounded recursive-descent parser and exact evaluation.

Used to check Countdown answers (model output is never passed to `eval`) and to write the
step-by-step worked solutions of the embedded arithmetic tasks. Grammar, ASCII only:

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := NUMBER | "(" expr ")"

No unary minus, no decimals, no exponent: with only + - * / on a bounded count of bounded
integers the value stays small, so evaluation with `Fraction` is always fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

MAX_CHARS = 200  # longer text is rejected before tokenising
MAX_DEPTH = 12  # parenthesis nesting; deeper input is rejected without recursing further
MAX_DIGITS = 9  # per number literal
MAX_NUMBERS = 16

_TOKEN = re.compile(r"\s*(?:([0-9]+)|([-+*/()]))")
_ALLOWED = re.compile(r"[0-9+\-*/() ]*")


@dataclass(frozen=True)
class Node:
    """A number leaf (op is None, value set) or a binary operation."""

    op: str | None
    value: int = 0
    left: Node | None = None
    right: Node | None = None


class _Reject(Exception):
    """Internal: the text is not a valid bounded expression."""


def tokenize(text: str) -> list[str] | None:
    """The tokens of `text`, or None if it has anything but ASCII digits, + - * / ( ) and spaces."""
    if len(text) > MAX_CHARS or not _ALLOWED.fullmatch(text):
        return None
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:  # only trailing spaces remain
            break
        tokens.append(m.group(1) or m.group(2))
        pos = m.end()
    return tokens


def parse(text: str) -> Node | None:
    """Parse `text` into a tree, or None if it is invalid or exceeds any bound; never raises."""
    if not isinstance(text, str):
        return None
    tokens = tokenize(text)
    if not tokens:
        return None
    pos = 0
    numbers = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def expr(depth: int) -> Node:
        node = term(depth)
        while peek() in ("+", "-"):
            op = take()
            node = Node(op, left=node, right=term(depth))
        return node

    def term(depth: int) -> Node:
        node = factor(depth)
        while peek() in ("*", "/"):
            op = take()
            node = Node(op, left=node, right=factor(depth))
        return node

    def factor(depth: int) -> Node:
        nonlocal numbers
        tok = peek()
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise _Reject
            take()
            node = expr(depth + 1)
            if peek() != ")":
                raise _Reject
            take()
            return node
        if tok is None or not tok.isdigit() or len(tok) > MAX_DIGITS:
            raise _Reject
        numbers += 1
        if numbers > MAX_NUMBERS:
            raise _Reject
        return Node(None, value=int(take()))

    try:
        tree = expr(0)
    except _Reject:
        return None
    return tree if pos == len(tokens) else None


def evaluate(node: Node) -> Fraction | None:
    """Exact value of the tree, or None on division by zero."""
    if node.op is None:
        return Fraction(node.value)
    left, right = evaluate(node.left), evaluate(node.right)
    if left is None or right is None:
        return None
    if node.op == "+":
        return left + right
    if node.op == "-":
        return left - right
    if node.op == "*":
        return left * right
    return None if right == 0 else left / right


def leaves(node: Node) -> list[int]:
    """The number literals of the tree, left to right."""
    if node.op is None:
        return [node.value]
    return leaves(node.left) + leaves(node.right)


def fmt(value: Fraction) -> str:
    """A Fraction as an integer or "p/q"."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{value.numerator}/{value.denominator}"


def steps(node: Node) -> list[str]:
    """One "a op b=c" line per operation in evaluation order: a short worked solution."""
    lines: list[str] = []

    def walk(n: Node) -> Fraction:
        if n.op is None:
            return Fraction(n.value)
        a, b = walk(n.left), walk(n.right)
        c = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else Fraction(0)}[n.op]
        lines.append(f"{fmt(a)}{n.op}{fmt(b)}={fmt(c)}")
        return c

    walk(node)
    return lines


def answered_after_first_step(solution: str, answer: str, *, expression: bool) -> str | None:
    """A worked solution ("a op b=c" lines, then a line holding `answer`) cut after its first
    step, that step's result (or, with `expression`, its expression) given as the answer; None
    where there are not two steps to cut between."""
    *lines, answer_line = solution.split("\n")
    if answer not in answer_line or len(lines) < 2:
        return None
    left, result = lines[0].rsplit("=", 1)
    return f"{lines[0]}\n{answer_line.replace(answer, left if expression else result)}"


def to_text(node: Node) -> str:
    """Compact text of the tree with only the parentheses that precedence needs."""
    if node.op is None:
        return str(node.value)
    left, right = to_text(node.left), to_text(node.right)
    prec = {"+": 1, "-": 1, "*": 2, "/": 2}
    if node.left.op is not None and prec[node.left.op] < prec[node.op]:
        left = f"({left})"
    # The right operand needs parentheses when it binds looser, or equally under - and /.
    if node.right.op is not None and (
        prec[node.right.op] < prec[node.op]
        or (prec[node.right.op] == prec[node.op] and node.op in "-/")
    ):
        right = f"({right})"
    return f"{left}{node.op}{right}"
