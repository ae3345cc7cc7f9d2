"""Reading JSON given as text or as a file, with one-line errors (for ``EmergenceInit`` and ``EmergencePlan``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

JsonSource = Union[str, "os.PathLike[str]"]


def read_json(source: JsonSource) -> tuple[Any, str]:
    """``(data, where)`` from JSON text (a ``str``) or a file (a ``pathlib.Path`` or other path object).

    ``where`` names the file (``""`` for text), so callers can say which file was wrong. A folder is read as its
    ``config.json`` (a saved checkpoint). Every failure is one ``ValueError`` (``TypeError`` for other types).
    """
    if isinstance(source, os.PathLike):
        path = Path(source)
        if path.is_dir():
            path = path / "config.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: cannot read it ({type(err).__name__}: {err})") from None
        where = str(path)
    elif isinstance(source, str):
        text, where = source, ""
    else:
        raise TypeError(f"expected JSON text or a path, got {type(source).__name__}")
    try:
        return json.loads(text), where
    except json.JSONDecodeError as err:
        hint = ""
        if not where and not text.lstrip().startswith(("{", "[")) and (text.endswith(".json") or os.path.exists(text)):
            hint = f" ({text!r} looks like a file name: pass pathlib.Path({text!r}) to read the file)"
        raise ValueError(f"{where + ': ' if where else ''}invalid JSON at line {err.lineno} column {err.colno}: "
                         f"{err.msg}{hint}") from None
