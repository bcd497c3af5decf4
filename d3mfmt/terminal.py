"""Text from an archive or a folder name, made safe to print on a terminal.

Class names, dataset names and ids come from files a user downloaded: a name
holding ``ESC [ 2 J`` would clear the screen, one holding U+202E would print
reversed. Every such name goes through :func:`printable` before it reaches
stdout, stderr or a log.
"""

from __future__ import annotations

import unicodedata

# control (Cc), format (Cf: bidi overrides, zero-width), surrogate (Cs),
# unassigned (Cn), private use (Co), line and paragraph separators (Zl, Zp)
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Cn", "Co", "Zl", "Zp"})


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text) -> str:
    """``text`` with every control, format, surrogate or separator character escaped as ``\\xNN``/``\\uNNNN``.

    Printable text, including non-ASCII letters, is unchanged; a backslash is
    kept as is. Non-strings are converted with ``str`` first.

    Example:
        >>> printable("seven\\x1b[2J")
        'seven\\\\x1b[2J'
    """
    text = str(text)
    if text.isprintable() and text.isascii():
        return text
    return "".join(_escape(ch) if unicodedata.category(ch) in _UNPRINTABLE else ch for ch in text)
