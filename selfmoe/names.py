"""Names that come from data or users and become file or directory names (domains, expert names).

A domain ``"../../x"`` in a seed file once made ``specialize`` write outside ``--output``. Every such
name must be a plain file-name component: letters, digits, ``_``, ``-`` and ``.``, not starting with
``.`` (no hidden files, no ``..``), at most 128 characters. Torch-free: the CLI imports it too.
"""
from __future__ import annotations

import re
from typing import Any, Type

__all__ = ["SAFE_NAME_PATTERN", "is_safe_name", "check_safe_name"]

SAFE_NAME_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}"
_SAFE_NAME = re.compile(SAFE_NAME_PATTERN)


def is_safe_name(name: Any) -> bool:
    """True when ``name`` is a string usable as one file-name component (see the module docstring)."""
    return isinstance(name, str) and _SAFE_NAME.fullmatch(name) is not None


def check_safe_name(name: Any, what: str, *, where: str = "", error: Type[Exception] = ValueError) -> str:
    """Return ``name`` if :func:`is_safe_name`, else raise ``error`` (a ``ValueError`` by default) whose
    message starts with ``where`` (e.g. ``"seeds.jsonl:3: "``) and names ``what`` (e.g. ``"domain"``)."""
    if not is_safe_name(name):
        raise error(
            f"{where}{what} {name!r} is not a safe name: use letters, digits, '_', '-' and '.' (not first), "
            "at most 128 characters (it becomes a file or directory name)"
        )
    return name
