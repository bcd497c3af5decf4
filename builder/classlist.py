"""Which classes a build reads: ``--classes FILE`` parsed, and every class entry checked.

A class id names a sub-folder of the data folder (relative, no ``..``: a
``--classes`` entry never reads outside DATA), and neither ids nor names may
hold control, bidirectional-control or line-separator characters (they make a
name display as other text, in logs, cards and d3m-inspect).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path, PurePosixPath

from d3mfmt import D3MError

# bidirectional-text controls (Unicode category Cf): they make a name display as another one
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _bad_character(text: str) -> str | None:
    """The first control, bidi-control, separator or surrogate character of ``text``, as ``U+XXXX (NAME)``."""
    for ch in text:
        if ch in BIDI_CONTROLS or unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
            return f"U+{ord(ch):04X} ({unicodedata.name(ch, 'a control character')})"
    return None


def check_class_entry(cid: str, name: str | None, root: Path) -> None:
    """A class id must name a folder under ``root`` (relative, no ``..``), and ids and names hold no control characters."""
    for what, text in (("class", cid), ("class name", name)):
        bad = None if text is None else _bad_character(text)
        if bad:
            raise D3MError(f"{what} {text!r} holds the character {bad}, which makes names display as other text; "
                           "rename the folder (or give a plain name in --classes)")
    parts = PurePosixPath(cid).parts
    if not parts or PurePosixPath(cid).is_absolute() or "\\" in cid or ".." in parts:
        raise D3MError(f"class {cid!r} is not a folder name under the data folder {root}; --classes entries name "
                       "sub-folders of DATA (relative, without '..')")


def read_class_list(path: Path) -> tuple[list[str], list[str] | None]:
    """``--classes FILE``: one class per line, ``id`` or ``id<TAB or space>name``.

    A line with a tab splits at the first tab (so folder names may hold spaces); otherwise at the first space.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise D3MError(f"--classes {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise D3MError(f"--classes {path} is not UTF-8 text; save it as UTF-8, one class folder per line") from None
    lines = [ln.strip(" \r\n") for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise D3MError(f"--classes {path} lists no classes; write one class folder name per line")
    ids, names = [], []
    for line in lines:
        parts = line.split("\t", 1) if "\t" in line else line.split(None, 1)
        ids.append(parts[0])
        names.append(parts[1] if len(parts) > 1 else parts[0])
    seen: dict[str, int] = {}
    for number, cid in enumerate(ids, 1):
        if cid in seen:
            raise D3MError(f"--classes {path}: class id {cid!r} is listed twice (entries {seen[cid]} and {number}); "
                           "class ids must be unique")
        seen[cid] = number
    return ids, names
