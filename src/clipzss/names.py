"""Class-name lists as users type them: one validation for every path (torch-free, so `predict --onnx` shares it).

CLIP's tokenizer cleans a name before it embeds it (ftfy's fixes, HTML entities decoded, lowercased, whitespace
collapsed), so ``Cat`` and ``cat``, ``ｃａｔ`` (full-width) and ``cat``, ``café`` composed and decomposed, ``R&amp;D``
and ``R&D`` get the same text embedding: two such names would be two classes that can never be told apart. They are
refused like exact duplicates.
"""

from __future__ import annotations

import html
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from clipzss.errors import UsageError

BOM = "\ufeff"

# The most class names one list may hold, on every path (predict, an ONNX file's baked-in names, an embeddings
# file, the demo's --max-classes): each name is a text-encoder pass and a channel of every logit map, and the
# largest benchmark vocabulary is ADE-847's 847 names. A list of 100,000 names from someone else's file would
# otherwise take minutes before the first pixel.
MAX_CLASS_NAMES = 4096


def normalize_class_name(name: str) -> str:
    """The name as CLIP's text encoder sees it: HTML entities decoded (twice, as open_clip does), NFKC (full-width
    letters, composed accents), lowercased, whitespace collapsed (open_clip's ``clean='lower'``)."""
    name = unicodedata.normalize("NFKC", html.unescape(html.unescape(name)))
    return " ".join(name.replace(BOM, "").split()).lower()


def read_names_file(path: str | Path) -> list[str]:
    """Class names from a file, one a line (blank lines skipped, a UTF-8 byte-order mark dropped), checked by
    `parse_class_names`; the way to give names that contain commas."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"class file not found: {path} (give a text file with one class name per line)"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    names = [line for line in text.splitlines() if line.strip()]
    if not names:
        raise UsageError(f"{path} holds no class names: give one name per line")
    return parse_class_names(names)


def parse_class_names(text: str | Sequence[str]) -> list[str]:
    """Split a comma-separated list (or clean a sequence) and reject empty names and duplicates.

    Duplicates are judged after `normalize_class_name`; the message names every spelling of each duplicate.
    """
    parts = text.split(",") if isinstance(text, str) else [str(n) for n in text]
    names = [n.replace(BOM, "").strip() for n in parts]
    if len(names) > MAX_CLASS_NAMES:
        raise UsageError(
            f"{len(names):,} class names given; clipzss handles at most {MAX_CLASS_NAMES:,} at once"
        )
    if not names or all(not n for n in names):
        raise UsageError("the class list is empty: give at least one class name, e.g. --classes 'cat,grass'")
    if any(not n for n in names):
        first = names.index("")
        raise UsageError(
            f"the class list {_short_list(names)} contains an empty name at index {first} (a stray comma?)"
        )
    spellings: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for name in names:
        key = normalize_class_name(name)
        counts[key] = counts.get(key, 0) + 1
        if name not in spellings.setdefault(key, []):
            spellings[key].append(name)
    dupes = sorted(key for key, count in counts.items() if count > 1)
    if dupes:
        groups = [" = ".join(spellings[key]) for key in dupes]
        why = (
            " (the same name to CLIP, which ignores case, extra spaces, full-width letters, accent encodings and "
            "HTML entities)"
            if any(len(spellings[key]) > 1 for key in dupes)
            else ""
        )
        raise UsageError(f"duplicate class names: {'; '.join(groups)}{why}")
    return names


def _short_list(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n[:80]) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} names)"
