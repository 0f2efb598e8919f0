"""Query text normalisation: the one function every stage uses to key a query."""
from __future__ import annotations

import re
import unicodedata

_SPACES = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s&'%.-]")


def normalize_query(text: str) -> str:
    """Lower-case, NFKC, strip punctuation other than ``& ' % . -``, collapse whitespace.

    >>> normalize_query("  Coca-Cola   ZERO!! ")
    'coca-cola zero'
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCT.sub(" ", text)
    return _SPACES.sub(" ", text).strip()
