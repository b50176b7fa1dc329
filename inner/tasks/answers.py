"""Final-answer extraction and math-verify comparison for all tasks, bounded against bad input.

Every function here takes arbitrary model output and returns quickly: the text is cut to a bounded
tail before any regex, extracted answers are length-limited, and expressions that could make sympy
compute for a long time (towers of powers, huge exponents or factorials) are rejected before
math-verify sees them.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache

from math_verify import parse, verify

TAIL_CHARS = 4000  # the final answer is at the end; older text is never scanned
MAX_ANSWER_CHARS = 120

_HASH_ANSWER = re.compile(r"####[ \t]*([^\n]*)")
# ASCII digits only, on purpose: int("٥") == 5 in Python, and such digits are not answers.
_HASH_NUMBER = re.compile(r"\$?(-?[0-9][0-9,]*(?:\.[0-9]+)?)\.?")


def tail(text: object) -> str:
    """The last TAIL_CHARS characters of `text`, or "" if it is not a string."""
    return text[-TAIL_CHARS:] if isinstance(text, str) else ""


def hash_answer(text: str) -> str | None:
    """The number that follows the last "####" (GSM8K format), commas removed, or None."""
    found = _HASH_ANSWER.findall(tail(text))
    if not found:
        return None
    # Only a plain number (optionally "$72" or "72.") counts; "#### 9**9" is not an answer.
    m = _HASH_NUMBER.fullmatch(found[-1].strip()[:MAX_ANSWER_CHARS])
    return m.group(1).replace(",", "") if m else None


def boxed_answer(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces matched), or None."""
    text = tail(text)
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, min(len(text), i + MAX_ANSWER_CHARS + 2)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            content = text[i + 1 : j].strip()
            return content or None
    return None  # unbalanced or too long


def tagged_answer(text: str) -> str | None:
    """The content of the last <answer>...</answer>, stripped, or None."""
    text = tail(text)
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, max(end, 0))
    if end < 0 or start < 0 or end - start > 2 * MAX_ANSWER_CHARS:
        return None
    return text[start + len("<answer>") : end].strip() or None


def _normalize(answer: str) -> str:
    """Spacing and trivial wrappers removed, so that most correct answers compare as strings."""
    s = answer.replace(" ", "").replace("\\!", "").replace("$", "")
    s = re.sub(r"\\(?:d|t)?frac\{(-?[0-9]+)\}\{([0-9]+)\}", r"\1/\2", s)
    return s.removesuffix(".0") if re.fullmatch(r"-?[0-9]+\.0", s) else s


def _exponents(answer: str) -> list[str] | None:
    """Every exponent of ^ or ** ({...} and (...) groups whole); None if unbalanced or a tower."""
    found = []
    for m in re.finditer(r"\^|\*\*", answer):
        rest = answer[m.end() :].lstrip()
        if rest[:1] in ("{", "("):
            close, depth = {"{": "}", "(": ")"}[rest[0]], 0
            for i, ch in enumerate(rest):
                depth += (ch == rest[0]) - (ch == close)
                if depth == 0:
                    found.append(rest[1:i])
                    break
            else:
                return None
        else:
            found.append(re.match(r"[0-9A-Za-z.]*", rest).group(0))
        after = rest[len(found[-1]) + (2 if rest[:1] in ("{", "(") else 0) :].lstrip()
        if after.startswith(("^", "**")):  # a**b**c: a tower
            return None
    return found


def sympy_safe(answer: str) -> bool:
    """Whether handing `answer` to sympy is safe: short, shallow, no big powers or factorials."""
    if not answer.isascii() or len(answer) > MAX_ANSWER_CHARS:
        return False
    if "__" in answer or any(ch in answer for ch in "`;\"'"):
        return False  # never code-like text, even though math-verify does not evaluate it
    depth = 0
    for ch in answer:
        depth += 1 if ch in "({[" else -1 if ch in ")}]" else 0
        if depth > 8:
            return False
    if any(len(n) > 40 for n in re.findall(r"[0-9]+", answer)):
        return False
    # Towers (9^{9^9}) and big exponents (2^{100000}) make sympy build huge integers.
    exponents = _exponents(answer)
    if exponents is None:
        return False
    total = 1
    for exponent in exponents:
        if any(op in exponent for op in ("^", "*", "!")):
            return False
        total *= max([int(d) for d in re.findall(r"[0-9]+", exponent)] + [1])
        if total > 10_000:
            return False
    # Only small factorials: "99999!" is slow.
    return all(len(n) <= 3 for n in re.findall(r"([0-9]+)\s*!", answer))


def _timeout() -> int | None:
    # math-verify's timeout uses signal.alarm, which only works in the main thread; elsewhere the
    # sympy_safe filter is the only guard.
    return 1 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=16384)
def math_parse(answer: str, trusted: bool = False) -> tuple:
    """math-verify's parse of a bare answer (as if in \\boxed{}); () if unsafe or unparseable.

    `trusted` (dataset gold answers) skips the sympy_safe filter, not the timeout."""
    if not isinstance(answer, str) or not (trusted or sympy_safe(answer)):
        return ()
    try:
        return tuple(parse(f"\\boxed{{{answer}}}", parsing_timeout=_timeout()))
    except Exception:  # math-verify reports most errors itself; this is the last guard
        return ()


def math_equal(pred: str | None, gold: str) -> bool:
    """Whether answer `pred` equals `gold` mathematically (math-verify); never raises."""
    if not pred or not isinstance(pred, str):
        return False
    if _normalize(pred) == _normalize(gold):
        return True
    pred_parsed = math_parse(pred)  # first: unsafe predictions stop here, before any sympy work
    gold_parsed = math_parse(gold, trusted=True) if pred_parsed else ()
    if not gold_parsed:
        return False
    try:
        return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=_timeout()))
    except Exception:
        return False
