"""MkDocs hook: tidy reStructuredText leftovers in the docstrings rendered by mkdocstrings.

kdkit's docstrings follow the Google style but sometimes name objects with Sphinx roles,
e.g. ``:class:`LossTerm``` or ``:func:`~kdkit.checkpoint.load_model```, and introduce code
with reST's ``::``. mkdocstrings interprets neither, so the reference pages would show the raw
``:class:`` prefixes. This hook, which only rewrites generated HTML (no page source and no
library code), therefore

* drops a role prefix, shortening a ``~``-prefixed path to its last part as Sphinx does;
* treats a bare ``class:`` at the start of a paragraph the same way: a Google-style
  ``Returns:`` entry such as ``A :class:`X`; ...`` is split at its first colon, which eats
  the role's leading colon;
* turns a paragraph-final ``::`` into a single colon.
"""

from __future__ import annotations

import re

_ROLE = re.compile(
    r"(?<![\w:])(?::|(?<=<p>))(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):<code>(~?)([^<]*)</code>"
)
_LITERAL_MARKER = re.compile(r"(?<!:)::</p>")


def _replace(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    if tilde:
        target = target.rsplit(".", 1)[-1]
    return f"<code>{target}</code>"


def on_page_content(html: str, **kwargs: object) -> str:
    """Rewrites the roles and literal-block markers in each page's HTML."""
    return _LITERAL_MARKER.sub(":</p>", _ROLE.sub(_replace, html))
