"""How searchable text is cut into terms, shared by every backend.

Searchable fields are indexed as lowercase 2–3-grams of every character (spaces
included), so any substring of two or more characters finds its documents — Korean
too, which has no spaces inside words. A query must match all 3-grams of its text
(or its one 2-gram) within one field. Backends apply the same rule so they return
the same candidates; the OLAP store then checks each one exactly.
"""

from __future__ import annotations

from typing import Any

import tantivy

MIN_GRAM, MAX_GRAM = 2, 3


def analyzer() -> Any:
    """tantivy's analyzer for searchable fields (Elasticsearch mirrors it in its mapping)."""
    return (
        tantivy.TextAnalyzerBuilder(
            tantivy.Tokenizer.ngram(min_gram=MIN_GRAM, max_gram=MAX_GRAM, prefix_only=False)
        )
        .filter(tantivy.Filter.lowercase())
        .build()
    )


def grams(text: str) -> list[str]:
    """The 3-grams (or the one 2-gram) a substring query must match, lowercased;
    empty for text shorter than two characters, which matches everything."""
    text = text.lower()
    if len(text) < MIN_GRAM:
        return []
    if len(text) == MIN_GRAM:
        return [text]
    return sorted({text[i : i + MAX_GRAM] for i in range(len(text) - MAX_GRAM + 1)})
