"""Quality filters for self-generated instruction/response pairs, with a count per filter.

The paper used no filtering and named it future work; a small model writing its own data produces
empty, cut-off, template-leaking and repeated items, so we drop them. Each dropped item is counted
under exactly one key (the first filter it fails), in this order:

=====================  ===========================================================================
``instruction_empty``  nothing left after parsing (no word characters)
``instruction_short``  fewer than ``min_instruction_words`` words
``instruction_long``   more than ``max_instruction_tokens`` tokens
``instruction_unfinished``  generation hit ``max_new_tokens`` before the instruction ended
``instruction_format`` template markers (``### Input`` ...) or U+FFFD (broken decoding) inside
``seed_exact``         same normalised text as a seed instruction
``exact_dup``          same normalised text as an instruction kept earlier
``seed_near``          ROUGE-L F >= ``near_dup_threshold`` against a seed instruction
``near_dup``           ROUGE-L F >= ``near_dup_threshold`` against an instruction kept earlier
``response_empty`` / ``response_short`` / ``response_long`` / ``response_unfinished`` / ``response_format``
                       the same checks on the response
``code_syntax``        domain ``coding``: the response's code (its first fenced block, else the whole
                       response) does not parse (``ast.parse``); ``code_must_parse``, on by default.
                       A response that was cut off (and kept: ``drop_unfinished=False``) is not judged
``code_asserts``       domain ``coding``, opt-in (``run_code_asserts``): the instruction states
                       ``assert`` lines and the response's code plus those lines fails in the sandbox
                       (:func:`selfmoe.eval_scoring.run_program`: this RUNS MODEL-WRITTEN CODE)
``answer_letter_share``  an instruction with lettered options ("(A) ... (B) ..."): the answer's letter
                       would hold more than ``max_answer_letter_share`` of the domain's kept answers
                       (checked once ``answer_balance_min_kept`` answers are kept), so the data
                       cannot teach "always answer (C)"
=====================  ===========================================================================

"Normalised" = Unicode NFKC, lower case, runs of word characters (``\\w+``) as tokens, so case,
spacing and punctuation differences do not hide a copy. Duplicates are judged on the instruction
(plus input), like Self-Instruct; its threshold 0.7 is our default.

Near-duplicate search (:class:`NearDuplicateIndex`) does not compare every pair with an LCS. An
inverted index gives, for a query against all N stored texts at once (numpy), the multiset token
overlap ``o``; since ``LCS <= o``, ``F = 2 LCS / (m + n) <= 2 o / (m + n)``, and only texts whose
bound reaches the threshold get an exact LCS (bit-parallel, O(n) big-int operations for lengths
m, n). Cost per query: O(sum of the posting-list lengths of its distinct tokens) vectorised, at
worst O(N * m) when every token is common, plus a few exact LCS; for 5,000 generated + 100 seed
instructions that is seconds in total, not the 12.5M Python LCS runs of the naive loop.
"""
from __future__ import annotations

import ast
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["FilterConfig", "FILTER_KEYS", "empty_stats", "normalize_tokens", "lcs_length", "rouge_l_f",
           "NearDuplicateIndex", "check_text", "filter_records", "assert_lines", "check_code", "AnswerBalance",
           "check_domain"]

FILTER_KEYS: Tuple[str, ...] = (
    "instruction_empty", "instruction_short", "instruction_long", "instruction_unfinished", "instruction_format",
    "seed_exact", "exact_dup", "seed_near", "near_dup",
    "response_empty", "response_short", "response_long", "response_unfinished", "response_format",
    "code_syntax", "code_asserts", "answer_letter_share",
)

# Markers that mean the model wrote past its slot into the next prompt section, or decoding broke.
_FORMAT_MARKERS = ("### Instruction", "### Response", "### Input", "\ufffd")
_WORD = re.compile(r"\w+")

_popcount: Callable[[int], int] = getattr(int, "bit_count", None) or (lambda v: bin(v).count("1"))


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds for :func:`check_text` and :class:`NearDuplicateIndex`.

    Token limits use the ``count_tokens`` function passed alongside (the model's tokenizer in the
    pipeline; whitespace words when there is none). ``near_dup_threshold=None`` turns near-duplicate
    search off (exact duplicates are still dropped). ``drop_unfinished=False`` keeps texts that hit
    the generation limit.

    Domain-aware filters (see the module docstring): ``code_must_parse`` (domain ``coding``: the
    response's code must parse), ``run_code_asserts`` (opt-in: run the response's code plus the
    instruction's ``assert`` lines in the sandbox, ``code_timeout`` seconds each; this executes
    model-written code), ``max_answer_letter_share`` (``None`` = off: the largest share one option
    letter may hold among a domain's kept multiple-choice answers, enforced once
    ``answer_balance_min_kept`` of them are kept).
    """

    min_instruction_words: int = 3
    min_response_words: int = 1
    max_instruction_tokens: int = 1024
    max_response_tokens: int = 2048
    drop_unfinished: bool = True
    near_dup_threshold: Optional[float] = 0.7
    code_must_parse: bool = True
    run_code_asserts: bool = False
    code_timeout: float = 10.0
    max_answer_letter_share: Optional[float] = 0.5
    answer_balance_min_kept: int = 8

    def __post_init__(self) -> None:
        t = self.near_dup_threshold
        if t is not None and not 0 < t <= 1:
            raise ValueError(f"near_dup_threshold must be in (0, 1] or None, got {t}")
        share = self.max_answer_letter_share
        if share is not None and not 0 < share <= 1:
            raise ValueError(f"max_answer_letter_share must be in (0, 1] or None, got {share}")
        if not (isinstance(self.code_timeout, (int, float)) and self.code_timeout > 0):
            raise ValueError(f"code_timeout must be > 0 seconds, got {self.code_timeout!r}")
        if self.answer_balance_min_kept < 0:
            raise ValueError(f"answer_balance_min_kept must be >= 0, got {self.answer_balance_min_kept}")
        for name in ("min_instruction_words", "min_response_words", "max_instruction_tokens", "max_response_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def empty_stats() -> Dict[str, int]:
    """A stats dict with every filter key at 0 (so reports always list every filter)."""
    return {k: 0 for k in FILTER_KEYS}


def normalize_tokens(text: str) -> List[str]:
    """NFKC, lower case, word-character runs: the token sequence duplicates are judged on."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def _word_count(text: str) -> int:
    return len(text.split())


def check_text(text: str, kind: str, config: FilterConfig, *, finished: bool = True,
               count_tokens: Optional[Callable[[str], int]] = None) -> Optional[str]:
    """The first failed filter key for one instruction or response (``kind``), or ``None`` if it passes."""
    if kind not in ("instruction", "response"):
        raise ValueError(f"kind must be 'instruction' or 'response', got {kind!r}")
    if not _WORD.search(text):
        return f"{kind}_empty"
    min_words = config.min_instruction_words if kind == "instruction" else config.min_response_words
    if _word_count(text) < min_words:
        return f"{kind}_short"
    max_tokens = config.max_instruction_tokens if kind == "instruction" else config.max_response_tokens
    if (count_tokens or _word_count)(text) > max_tokens:
        return f"{kind}_long"
    if config.drop_unfinished and not finished:
        return f"{kind}_unfinished"
    if any(m in text for m in _FORMAT_MARKERS):
        return f"{kind}_format"
    return None


_ASSERT_LINE = re.compile(r"^\s*assert\b.*$", re.M)


def assert_lines(instruction: str) -> List[str]:
    """The instruction's lines that are ``assert`` statements (as the built-in coding seeds state their
    tests), stripped; only those that parse on their own."""
    out = []
    for m in _ASSERT_LINE.finditer(instruction or ""):
        line = m.group(0).strip()
        try:
            ast.parse(line)
        except (SyntaxError, ValueError):
            continue
        out.append(line)
    return out


def check_code(instruction: str, response: str, config: FilterConfig) -> Optional[str]:
    """``code_syntax`` / ``code_asserts`` for a coding pair (see the module docstring), or ``None``.

    With ``config.run_code_asserts`` this runs the response's code in :mod:`selfmoe.sandbox`;
    :class:`selfmoe.sandbox.SandboxError` (the sandbox cannot run here) propagates.
    """
    if not (config.code_must_parse or config.run_code_asserts):
        return None
    from .eval_scoring import extract_code

    code = extract_code(response)
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):  # ValueError: NUL bytes
        return "code_syntax" if config.code_must_parse else "code_asserts"
    if config.run_code_asserts:
        tests = assert_lines(instruction)
        if tests:
            from .eval_scoring import run_program

            program = code.rstrip() + "\n\n\n" + "\n".join(tests) + "\n"
            if not run_program(program, timeout=config.code_timeout).passed:
                return "code_asserts"
    return None


class AnswerBalance:
    """Option letters of a domain's kept multiple-choice answers, for the ``answer_letter_share`` filter.

    ``letter(instruction, response)``: the answer's letter, or ``None`` when the instruction has no
    lettered options ("(A)", "(B)", ...) or the response picks none. ``check(letter)``: the filter key
    if keeping one more answer with that letter would put its share above ``max_share`` while at least
    ``min_kept`` answers are already kept. ``add(letter)`` records a kept answer.
    """

    def __init__(self, max_share: Optional[float] = 0.5, min_kept: int = 8) -> None:
        self.max_share = max_share
        self.min_kept = min_kept
        self.counts: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @staticmethod
    def letter(instruction: str, response: str) -> Optional[str]:
        from .eval_scoring import _PAREN_LETTER, extract_choice

        if len(set(_PAREN_LETTER.findall(instruction or ""))) < 2:
            return None
        return extract_choice(response, instruction)

    def check(self, letter: Optional[str]) -> Optional[str]:
        if self.max_share is None or letter is None:
            return None
        n = self.total
        if n < self.min_kept:
            return None
        return "answer_letter_share" if (self.counts[letter] + 1) / (n + 1) > self.max_share + 1e-12 else None

    def add(self, letter: Optional[str]) -> None:
        if letter is not None:
            self.counts[letter] += 1

    def copy(self) -> "AnswerBalance":
        new = AnswerBalance(self.max_share, self.min_kept)
        new.counts = Counter(self.counts)
        return new


def check_domain(domain: str, instruction: str, response: str, config: FilterConfig,
                 balance: Optional[AnswerBalance] = None, *, finished: bool = True) -> Optional[str]:
    """The domain-aware filters for one pair that passed :func:`check_text`: the first failed key or ``None``.

    Does not record the pair in ``balance`` (call ``balance.add`` once it is kept).
    """
    if domain == "coding" and finished:
        reason = check_code(instruction, response, config)
        if reason is not None:
            return reason
    if balance is not None:
        return balance.check(balance.letter(instruction, response))
    return None


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyrö): O(len(b)) big-int ops.

    Bit i of ``v`` is 0 where position i of ``a`` is matched in the current best chains; adding ``u``
    carries each matched run's lowest zero up to the next match, which is the DP row update done for
    all positions of ``a`` at once.
    """
    if not a or not b:
        return 0
    masks: Dict[Any, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        m = masks.get(tok)
        if m:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return len(a) - _popcount(v)


def rouge_l_f(a: Sequence[Any], b: Sequence[Any]) -> float:
    """ROUGE-L F-measure (beta 1) of two token sequences: ``2 * LCS / (len(a) + len(b))``."""
    if not a or not b:
        return 0.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


class _Growable:
    """An int32 array with amortised O(1) append (posting lists grow one document at a time)."""

    __slots__ = ("data", "n")

    def __init__(self) -> None:
        self.data = np.empty(8, dtype=np.int32)
        self.n = 0

    def append(self, x: int) -> None:
        if self.n == len(self.data):
            self.data = np.concatenate([self.data, np.empty_like(self.data)])
        self.data[self.n] = x
        self.n += 1

    def view(self) -> np.ndarray:
        return self.data[:self.n]


class NearDuplicateIndex:
    """Instructions seen so far, for exact and near-duplicate lookup (see the module docstring).

    ``add(tokens, source)`` stores normalised tokens with a source tag (``"seed"`` or ``"generated"``);
    ``find(tokens)`` returns ``(kind, source)`` with kind ``"exact"`` or ``"near"`` for the first
    match (exact beats near; seeds beat generated), or ``None``.
    """

    def __init__(self, threshold: Optional[float] = 0.7) -> None:
        self.threshold = threshold
        self._exact: Dict[Tuple[str, ...], str] = {}
        self._vocab: Dict[str, int] = {}
        self._docs: List[List[int]] = []
        self._lens = _Growable()
        self._is_seed = _Growable()
        self._post_docs: List[_Growable] = []
        self._post_cnts: List[_Growable] = []

    def __len__(self) -> int:
        return len(self._docs)

    def _ids(self, tokens: Sequence[str], grow: bool) -> List[int]:
        out = []
        for t in tokens:
            i = self._vocab.get(t)
            if i is None:
                if not grow:
                    out.append(-1)  # unseen token: matches nothing stored
                    continue
                i = self._vocab[t] = len(self._vocab)
                self._post_docs.append(_Growable())
                self._post_cnts.append(_Growable())
            out.append(i)
        return out

    def add(self, tokens: Sequence[str], source: str = "generated") -> None:
        if source not in ("seed", "generated"):
            raise ValueError(f"source must be 'seed' or 'generated', got {source!r}")
        key = tuple(tokens)
        if key not in self._exact or source == "seed":
            self._exact[key] = source
        if self.threshold is None or not tokens:
            return
        ids = self._ids(tokens, grow=True)
        doc = len(self._docs)
        self._docs.append(ids)
        self._lens.append(len(ids))
        self._is_seed.append(1 if source == "seed" else 0)
        for tid, c in Counter(ids).items():
            self._post_docs[tid].append(doc)
            self._post_cnts[tid].append(c)

    def find(self, tokens: Sequence[str]) -> Optional[Tuple[str, str]]:
        src = self._exact.get(tuple(tokens))
        if src is not None:
            return ("exact", src)
        if self.threshold is None or not tokens or not self._docs:
            return None
        ids = self._ids(tokens, grow=False)
        m = len(ids)
        overlap = np.zeros(len(self._docs), dtype=np.int32)
        for tid, c in Counter(i for i in ids if i >= 0).items():
            docs = self._post_docs[tid].view()
            # A document appears once per posting list, so fancy-index += is safe (no repeated indices).
            overlap[docs] += np.minimum(self._post_cnts[tid].view(), c)
        lens = self._lens.view()
        bound = 2.0 * overlap / (m + lens)
        cand = np.nonzero(bound >= self.threshold - 1e-12)[0]
        if cand.size == 0:
            return None
        # Seeds first (their count is reported separately), then the most promising bound.
        seed_flag = self._is_seed.view()[cand]
        cand = cand[np.lexsort((-bound[cand], -seed_flag))]
        for d in cand.tolist():
            doc = self._docs[d]
            if 2.0 * lcs_length(ids, doc) / (m + len(doc)) >= self.threshold - 1e-12:
                return ("near", "seed" if self._is_seed.data[d] else "generated")
        return None

    def check(self, tokens: Sequence[str]) -> Optional[str]:
        """The stats key for a duplicate (``seed_exact``, ``exact_dup``, ``seed_near``, ``near_dup``) or None."""
        hit = self.find(tokens)
        if hit is None:
            return None
        kind, source = hit
        if source == "seed":
            return "seed_exact" if kind == "exact" else "seed_near"
        return "exact_dup" if kind == "exact" else "near_dup"


def _dedup_text(record: Mapping[str, Any]) -> str:
    inp = str(record.get("input", "") or "").strip()
    return f"{record['instruction']}\n\n{inp}" if inp else str(record["instruction"])


def filter_records(records: Iterable[Mapping[str, Any]], seeds: Iterable[Mapping[str, Any]] = (),
                   config: FilterConfig = FilterConfig(), *,
                   count_tokens: Optional[Callable[[str], int]] = None) -> Tuple[List[Dict[str, Any]], Dict[str, int]]:
    """Filter finished records (e.g. an existing JSONL) in order; return the kept ones and per-filter counts.

    Records are judged one by one against the seeds and the records kept before them, the same rules
    the generation pipeline applies online (the ``*_unfinished`` filters need generation metadata and
    never fire here). The domain-aware filters use each record's ``domain`` (letter balance per domain).
    """
    stats = empty_stats()
    balances: Dict[str, AnswerBalance] = {}
    index = NearDuplicateIndex(config.near_dup_threshold)
    for s in seeds:
        index.add(normalize_tokens(_dedup_text(s)), "seed")
    kept: List[Dict[str, Any]] = []
    for rec in records:
        reason = check_text(_dedup_text(rec), "instruction", config, count_tokens=count_tokens)
        if reason is None:
            toks = normalize_tokens(_dedup_text(rec))
            reason = index.check(toks)
        if reason is None:
            reason = check_text(str(rec.get("output", "")), "response", config, count_tokens=count_tokens)
        domain = str(rec.get("domain", "") or "")
        balance = balances.setdefault(domain, AnswerBalance(config.max_answer_letter_share,
                                                            config.answer_balance_min_kept))
        if reason is None:
            reason = check_domain(domain, _dedup_text(rec), str(rec.get("output", "")), config, balance)
        if reason is not None:
            stats[reason] += 1
            continue
        balance.add(balance.letter(_dedup_text(rec), str(rec.get("output", ""))))
        index.add(toks, "generated")
        kept.append(dict(rec))
    return kept, stats
