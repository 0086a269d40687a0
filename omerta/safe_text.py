"""
Text that others control, made safe to show: L{printable} for a terminal
or a text log.

Peer names, channel names, a provider's VM records and refusal details
come from the network; written raw, a newline forges a line of output or
of a log, an escape sequence (C{ESC [2J}) drives the reader's terminal,
and a bidi override (U+202E) reorders what is shown.  C{printable} writes
each such character as a visible escape instead (C{\\x1b}, C{\\u202e}).
Only the standard library: the fast path of the C{omerta} command
(L{omerta.app.fast}) imports it.  JSON output needs none of this:
C{json.dumps} escapes control characters itself.
"""

from __future__ import annotations

import re

__all__ = ["printable"]

_UNSAFE = re.compile(
    "["
    "\x00-\x1f\x7f"  # C0 controls (ESC, CR, LF, TAB, BEL, ...) and DEL
    "\x80-\x9f"  # C1 controls (CSI U+009B, NEL U+0085, ...)
    "\u061c\u200e\u200f"  # bidi marks
    "\u2028\u2029"  # line and paragraph separators
    "\u202a-\u202e\u2066-\u2069"  # bidi embeddings, overrides and isolates
    "\ud800-\udfff"  # lone surrogates (bytes decoded with surrogateescape)
    "]"
)
"""What is never written raw.  Zero-width joiners and the like stay: they
are part of how some names are spelled and move nothing."""

ELLIPSIS = "..."


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: object, limit: int | None = None) -> str:
    """
    C{text} (C{str()} of anything else) with every control character, bidi
    control and line separator written as a visible escape, on one line.

    @param limit: at most this many characters come back; a longer text is
        cut (never inside an escape) and ends with C{...}.
    """
    if not isinstance(text, str):
        text = str(text)
    safe = _UNSAFE.sub(lambda match: _escape(match.group()), text)
    if limit is None or len(safe) <= limit:
        return safe
    room = max(0, limit - len(ELLIPSIS))
    pieces, used = [], 0
    for char in text:
        piece = _escape(char) if _UNSAFE.match(char) else char
        if used + len(piece) > room:
            break
        pieces.append(piece)
        used += len(piece)
    return "".join(pieces) + ELLIPSIS
