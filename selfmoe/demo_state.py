"""Which demo stages are up to date: each stage records the inputs it was built from.

A stage's *inputs* are its own settings (``key``) and the output ids of the stages it depends on;
its *output id* is new each time it completes. A stage is skipped only when its output is complete
and was built from the same inputs as now. So rerunning an earlier stage (more pairs, another model,
a deleted expert) makes exactly the stages downstream of it run again, and their stale outputs are
cleared first; an interrupted stage with unchanged inputs continues its own saved work instead.

The record lives in ``<output>/demo_state.json`` and is rewritten atomically after every change.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import uuid
from typing import Dict, Iterable, Optional, Sequence

__all__ = ["DemoState", "clear_outputs"]


class DemoState:
    """The stage records of one demo output folder."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            self.stages: Dict[str, Dict[str, Optional[str]]] = {
                k: v for k, v in (raw.get("stages") or {}).items() if isinstance(v, dict)}
        except (OSError, ValueError, AttributeError):
            self.stages = {}

    def inputs(self, key: str, deps: Sequence[str]) -> str:
        """Fingerprint of a stage's own settings and the outputs it reads."""
        parts = [key] + [f"{d}={(self.stages.get(d) or {}).get('output')}" for d in deps]
        return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:16]

    def up_to_date(self, name: str, inputs: str) -> bool:
        rec = self.stages.get(name) or {}
        return rec.get("inputs") == inputs and rec.get("output") is not None

    def built_from_other_inputs(self, name: str, inputs: str) -> bool:
        """Whether what ``name`` left on disk (if anything) came from other inputs: to be cleared, not continued."""
        rec = self.stages.get(name)
        return rec is None or rec.get("inputs") != inputs

    def started(self, name: str, inputs: str) -> None:
        self.stages[name] = {"inputs": inputs, "output": None}
        self._save()

    def finished(self, name: str, output: Optional[str] = None) -> None:
        self.stages[name]["output"] = output or uuid.uuid4().hex[:12]
        self._save()

    def _save(self) -> None:
        from .io_utils import atomic_write_json

        atomic_write_json(self.path, {"stages": self.stages})


def clear_outputs(paths: Iterable[pathlib.Path]) -> bool:
    """Remove stale stage outputs (folders or files); returns whether anything was there."""
    removed = False
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
            removed = True
        elif p.exists():
            p.unlink()
            removed = True
    return removed
