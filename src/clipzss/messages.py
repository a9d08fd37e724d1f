"""How clipzss words what it shows people: numbers in tables, shortened quotes and did-you-mean hints.

One spelling for each, in every table, report and error message. Standard library only.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable

MISSING = "-"  # a number that does not exist (NaN, infinite, None): a class never seen, a measure not taken


def fmt_number(value: object, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals, or `MISSING` when it is not a finite number."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return MISSING


def shorten(text: str, limit: int = 200) -> str:
    """``text`` on one line (runs of whitespace as one space), cut to ``limit`` characters ending in "..."."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(word: str, candidates: Iterable[str], n: int = 1, cutoff: float = 0.6) -> str:
    """ "did you mean 'x'?" (or 'x', 'y' or 'z' for ``n`` > 1) for the closest ``candidates``; "" when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=n, cutoff=cutoff)
    if not close:
        return ""
    quoted = [f"'{c}'" for c in close]
    return (
        "did you mean "
        + (quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}")
        + "?"
    )
