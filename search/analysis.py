"""How searchable text is cut into terms, shared by every backend.

Searchable fields are indexed as lowercase 2–3-grams of every character (spaces
included), so any substring of two or more characters finds its documents — Korean
too, which has no spaces inside words. A query must match all 3-grams of its text
(or its one 2-gram) within one field. Backends apply the same rule so they return
the same candidates; the OLAP store then checks each one exactly.

One character is a word in Korean (a surname: 김, 박) but not in English, so each
document also lists its distinct non-ASCII letters in one ``chars`` field: a single
Hangul (or other non-ASCII) letter is found through the index too. A single ASCII
character matches nearly everything and is left to the store.

Plain Python, no engine imported: the Elasticsearch backend and the query API must
work where tantivy is not installed (tantivy's analyzer lives in tantivy_index).
"""

from __future__ import annotations

from collections.abc import Iterable

MIN_GRAM, MAX_GRAM = 2, 3
CHARS_FIELD = "chars"


def grams(text: str) -> list[str]:
    """The 3-grams (or the one 2-gram) a substring query must match, lowercased;
    empty for text shorter than two characters, which matches everything."""
    text = text.lower()
    if len(text) < MIN_GRAM:
        return []
    if len(text) == MIN_GRAM:
        return [text]
    return sorted({text[i : i + MAX_GRAM] for i in range(len(text) - MAX_GRAM + 1)})


def letters(texts: Iterable[str | None]) -> list[str]:
    """The distinct non-ASCII letters of ``texts``, lowercased (the ``chars`` field)."""
    return sorted({c for t in texts if t for c in t.lower() if _letter(c)})


def single_letter(text: str) -> str | None:
    """``text`` lowercased when it is one non-ASCII letter (found through ``chars``)."""
    text = text.lower()
    return text if len(text) == 1 and _letter(text) else None


def indexed(text: str) -> bool:
    """Whether the index can propose candidates for ``text`` (else the store scans)."""
    return len(text) >= MIN_GRAM or single_letter(text) is not None


def _letter(c: str) -> bool:
    return not c.isascii() and c.isalnum()
