"""One error type for everything a user can get wrong.

The CLI prints ``SteerscopeError`` as a single line (no traceback); library users can catch it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SteerscopeError(ValueError):
    """A user-facing error with a one-line, actionable message."""


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' Did you mean: a, b?' for close matches of ``name`` in ``choices``, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""
