"""The records a training recipe reads: JSONL files and directories of them (:func:`load_records`), and one
domain's share (:func:`select_domain`).
"""
from __future__ import annotations

import os
import pathlib
from typing import List, Sequence, Union

from .data import PathLike, Record, read_jsonl

__all__ = ["load_records", "select_domain"]


def load_records(paths: Union[PathLike, Sequence[PathLike]]) -> List[Record]:
    """Training records from JSONL files and/or directories of them (every ``*.jsonl``, not recursive,
    sorted by name), in order. Records need ``instruction`` and ``output``; ``domain`` is optional.
    Errors name ``file:line`` (:class:`~selfmoe.data.DataFormatError`) or the missing path."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: List[Record] = []
    for raw in paths:
        p = pathlib.Path(raw)
        if p.is_dir():
            files = sorted(q for q in p.glob("*.jsonl") if q.is_file())
            if not files:
                raise FileNotFoundError(f"{os.fspath(raw)}: directory holds no *.jsonl data files")
        elif p.is_file():
            files = [p]
        else:
            raise FileNotFoundError(f"{os.fspath(raw)}: training data not found (expected a .jsonl file or a directory of them)")
        for q in files:
            out.extend(read_jsonl(q, require_domain=False))
    if not out:
        raise ValueError(f"no training records in {[os.fspath(p) for p in paths]}")
    return out


def select_domain(records: Sequence[Record], domain: str) -> List[Record]:
    """The records of one domain; ``ValueError`` listing the domains present when there are none."""
    picked = [r for r in records if r.get("domain") == domain]
    if not picked:
        present = sorted({str(r.get("domain")) for r in records})
        raise ValueError(f"no records of domain {domain!r}; the data holds domains {present}")
    return picked
