"""What the generated domains share: a version-proof random source and the loop that draws items.

Items must be the same on every Python version (a benchmark whose questions change with the
interpreter cannot be compared across runs), so every draw goes through :class:`Draw`, which uses
only :meth:`random.Random.random` (the one method whose sequence Python promises to keep) on a
generator seeded with a string (hashed with SHA-512, independent of ``PYTHONHASHSEED``).
"""
from __future__ import annotations

import random
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple, TypeVar

T = TypeVar("T")

#: A family: draws one item, returns ``(instruction, answer)`` (the answer is stored as ``str(answer)``).
Family = Callable[["Draw"], Tuple[str, Any]]


class Draw:
    """Random choices for one item, built on ``random.Random(key).random()`` only."""

    def __init__(self, key: str):
        self._rng = random.Random(key)

    def random(self) -> float:
        return self._rng.random()

    def randint(self, lo: int, hi: int) -> int:
        """An integer in ``[lo, hi]`` (both included)."""
        if hi < lo:
            raise ValueError(f"empty range [{lo}, {hi}]")
        return lo + min(int(self._rng.random() * (hi - lo + 1)), hi - lo)

    def choice(self, seq: Sequence[T]) -> T:
        if not seq:
            raise IndexError("choice from an empty sequence")
        return seq[self.randint(0, len(seq) - 1)]

    def shuffle(self, xs: List[Any]) -> None:
        """Fisher-Yates, in place."""
        for i in range(len(xs) - 1, 0, -1):
            j = self.randint(0, i)
            xs[i], xs[j] = xs[j], xs[i]

    def sample(self, seq: Sequence[T], k: int) -> List[T]:
        """``k`` distinct positions of ``seq``, in random order."""
        if not 0 <= k <= len(seq):
            raise ValueError(f"cannot sample {k} of {len(seq)}")
        pool = list(seq)
        out = []
        for _ in range(k):
            out.append(pool.pop(self.randint(0, len(pool) - 1)))
        return out

    def coin(self) -> bool:
        return self._rng.random() < 0.5


def text_key(text: str) -> str:
    """Lower case, whitespace collapsed: the form under which two instructions count as the same."""
    return " ".join(str(text).lower().split())


def generate(domain: str, task: str, families: Mapping[str, Family], n: int, seed: int,
             max_attempts: int = 1000) -> List[Dict[str, Any]]:
    """``n`` items of ``domain``: item ``i`` comes from family ``i % len(families)`` (so families are
    balanced), drawn from its own generator keyed by domain, seed, index and attempt. An item whose
    instruction repeats an earlier one is drawn again (next attempt), so the first ``k`` items of
    ``n`` are the ``k`` items of ``k``: ids and items are stable under a change of ``n``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    names = list(families)
    out: List[Dict[str, Any]] = []
    seen = set()
    for i in range(n):
        family = names[i % len(names)]
        for attempt in range(max_attempts):
            instruction, answer = families[family](Draw(f"selfmoe.benchmark/{domain}/{seed}/{i}/{attempt}"))
            key = text_key(instruction)
            if key not in seen:
                break
        else:  # pragma: no cover - the families have far more distinct items than any sensible n
            raise RuntimeError(f"{domain}/{family}: no new item after {max_attempts} attempts (n={n} too large?)")
        seen.add(key)
        out.append({"id": f"{domain}-s{seed}-{i:04d}", "domain": domain, "task": task, "family": family,
                    "instruction": instruction, "answer": str(answer)})
    return out


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")
