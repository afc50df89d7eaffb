"""Instruction data: JSONL records, the prompt (Alpaca or chat template), response-only labels, length bucketing.

A **record** is a JSON object on one line of a ``.jsonl`` file::

    {"instruction": "...", "input": "", "output": "...", "domain": "math"}

``instruction`` and ``output`` are non-empty strings, ``input`` is an optional string (``""`` when
absent), ``domain`` a non-empty string (it may come from the file name instead, see :func:`load_seeds`).
Other keys are kept as they are. Every error about a file names the file and the 1-based line.

Seeds, self-generated data and training data all use this one format, so the output of
:mod:`selfmoe.specialization` is training input without conversion.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .io_utils import atomic_write_text
from .names import check_safe_name

PathLike = Union[str, "os.PathLike[str]"]
Record = Dict[str, Any]

__all__ = [
    "DataFormatError",
    "ALPACA_PROMPT_WITH_INPUT",
    "ALPACA_PROMPT_NO_INPUT",
    "validate_record",
    "read_jsonl",
    "BUILTIN_SEEDS",
    "builtin_seeds_dir",
    "iter_jsonl",
    "iter_json_lines",
    "write_jsonl",
    "append_jsonl",
    "repair_jsonl_tail",
    "load_seeds",
    "format_prompt",
    "encode_prompt",
    "tokenize_example",
    "SFTDataset",
    "SFTCollator",
    "LengthGroupedBatchSampler",
    "padding_stats",
]

IGNORE_INDEX = -100

# The Stanford Alpaca template (the paper trains its experts with it). Kept byte-exact: experts trained
# here are prompted with the same strings at evaluation time, and a stray space changes the tokens.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataFormatError(ValueError):
    """A record or a JSONL line is malformed; the message starts with ``file:line:`` when known."""


# --------------------------------------------------------------------------------------------------
# Records and JSONL files


def where_prefix(path: Optional[PathLike], line: Optional[int]) -> str:
    """The start of an error message about a record: ``"file:line: "``, ``"file: "`` or ``"record N: "``."""
    if path is None:
        return "record: " if line is None else f"record {line}: "
    return f"{os.fspath(path)}:{line}: " if line is not None else f"{os.fspath(path)}: "


def validate_record(obj: Any, *, domain: Optional[str] = None, require_domain: bool = True,
                    path: Optional[PathLike] = None, line: Optional[int] = None) -> Record:
    """Check one record and return a normalised copy (``input`` defaults to ``""``).

    ``domain``: when given, a record without a ``domain`` gets it, and a record with a different one is
    an error (used when the domain comes from a file name). ``require_domain=False`` accepts records
    without any domain (plain SFT data). Raises :class:`DataFormatError` naming ``path:line`` and the key.
    """
    where = where_prefix(path, line)
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}expected a JSON object, got {type(obj).__name__}")
    rec = dict(obj)
    for key in ("instruction", "output"):
        if key not in rec:
            raise DataFormatError(f"{where}missing required key {key!r} (keys: {sorted(rec)})")
        if not isinstance(rec[key], str):
            raise DataFormatError(f"{where}{key!r} must be a string, got {type(rec[key]).__name__}")
        if not rec[key].strip():
            raise DataFormatError(f"{where}{key!r} is empty")
    inp = rec.get("input", "")
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise DataFormatError(f"{where}'input' must be a string, got {type(inp).__name__}")
    rec["input"] = inp
    if "domain" in rec and rec["domain"] is not None:
        if not isinstance(rec["domain"], str) or not rec["domain"].strip():
            raise DataFormatError(f"{where}'domain' must be a non-empty string, got {rec['domain']!r}")
        if domain is not None and rec["domain"] != domain:
            raise DataFormatError(f"{where}record has domain {rec['domain']!r} but {domain!r} was expected")
    elif domain is not None:
        rec["domain"] = domain
    elif require_domain:
        raise DataFormatError(f"{where}missing required key 'domain' (keys: {sorted(rec)})")
    else:
        rec.pop("domain", None)
    if "domain" in rec:  # domains become file names (specialize writes <domain>.jsonl)
        check_safe_name(rec["domain"], "'domain'", where=where, error=DataFormatError)
    return rec


def iter_json_lines(path: PathLike, *, skip_torn_tail: bool = False) -> Iterator[Tuple[int, Any]]:
    """``(line number, parsed JSON)`` for each non-blank line of a JSONL file.

    Raises ``FileNotFoundError`` naming the path, :class:`DataFormatError` with ``path:line`` for a line
    that is not JSON (noting a torn last line, the mark of an interrupted writer). ``skip_torn_tail``:
    a last line without its newline that does not parse ends the file quietly instead (files this
    library appends to; :func:`repair_jsonl_tail` removes such a remnant).
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{os.fspath(path)}: no such file" + (" (it is a directory)" if p.is_dir() else ""))
    with open(p, "rb") as f:  # bytes, decoded line by line: a bad byte is reported with its line number
        for lineno, raw_bytes in enumerate(f, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                if skip_torn_tail and not raw_bytes.endswith(b"\n"):
                    return  # a write cut inside a multi-byte character
                raise DataFormatError(f"{where_prefix(path, lineno)}not UTF-8 text (byte {exc.start + 1} of the line: "
                                      f"{raw_bytes[exc.start:exc.start + 1]!r}); JSONL files must be UTF-8") from None
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                if skip_torn_tail and not raw.endswith("\n"):
                    return
                cut = "" if raw.endswith("\n") else " (the last line is incomplete: was the writer interrupted?)"
                raise DataFormatError(f"{where_prefix(path, lineno)}invalid JSON: {exc.msg} at column {exc.colno}{cut}") from None
            yield lineno, obj


def iter_jsonl(path: PathLike, *, domain: Optional[str] = None, require_domain: bool = True,
               validate: bool = True) -> Iterator[Record]:
    """Yield the records of a JSONL file, one per non-blank line, validated (see :func:`validate_record`).

    Raises ``FileNotFoundError`` naming the path, :class:`DataFormatError` with ``path:line`` for a line
    that is not JSON or not a valid record. ``validate=False`` only requires JSON objects.
    """
    for lineno, obj in iter_json_lines(path):
        if validate:
            yield validate_record(obj, domain=domain, require_domain=require_domain, path=path, line=lineno)
        elif not isinstance(obj, dict):
            raise DataFormatError(f"{where_prefix(path, lineno)}expected a JSON object, got {type(obj).__name__}")
        else:
            yield obj


def read_jsonl(path: PathLike, *, domain: Optional[str] = None, require_domain: bool = True,
               validate: bool = True) -> List[Record]:
    """All records of a JSONL file as a list (see :func:`iter_jsonl`)."""
    return list(iter_jsonl(path, domain=domain, require_domain=require_domain, validate=validate))


def _dumps(rec: Mapping[str, Any]) -> str:
    # ensure_ascii=False keeps the files readable; json escapes "\n" inside strings, so one record is
    # always exactly one line.
    return json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n"


def write_jsonl(path: PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Write ``records`` to ``path`` atomically: readers see the old file or the complete new one."""
    text = "".join(_dumps(r) for r in records)  # serialise first: a bad record leaves the file untouched
    atomic_write_text(path, text)


def append_jsonl(path: PathLike, records: Sequence[Mapping[str, Any]]) -> None:
    """Append records and flush them to disk before returning (one write call, then fsync).

    A crash during the write can leave at most one incomplete last line, which
    :func:`repair_jsonl_tail` removes before the next append.
    """
    if not records:
        return
    text = "".join(_dumps(r) for r in records)
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def repair_jsonl_tail(path: PathLike) -> int:
    """Drop an incomplete last line (a crash in the middle of a write); return the bytes removed.

    Every record this module writes ends in ``"\\n"``, so a last line without one was being written when
    the process died. If that line still parses as JSON (only the newline was lost) the newline is added
    and nothing is removed. Lines before the last are never touched: corruption there is an error for
    the reader to report with its line number. A missing file is fine (returns 0).
    """
    p = pathlib.Path(path)
    if not p.is_file():
        return 0
    with open(p, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Scan backwards in blocks for the last newline: the file may be large, the tail is short.
        pos, block, start = size, 1 << 16, 0
        while pos > 0:
            lo = max(0, pos - block)
            f.seek(lo)
            chunk = f.read(pos - lo)
            k = chunk.rfind(b"\n")
            if k >= 0:
                start = lo + k + 1
                break
            pos = lo
        f.seek(start)
        tail = f.read()
        try:
            json.loads(tail.decode("utf-8"))
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
            return 0
        except (UnicodeDecodeError, json.JSONDecodeError):
            f.truncate(start)
            f.flush()
            os.fsync(f.fileno())
            return size - start


BUILTIN_SEEDS = "builtin"


def builtin_seeds_dir() -> pathlib.Path:
    """The seeds shipped with selfmoe: six pairs for each of knowledge, reasoning, math and coding, in
    the formats the default prompt templates ask for (written for this project; enough to run the
    pipeline, while the paper used 100 seeds per domain)."""
    return pathlib.Path(__file__).resolve().parent / "seeds"


def load_seeds(path: PathLike, *, domains: Optional[Sequence[str]] = None) -> Dict[str, List[Record]]:
    """Seed pairs per domain, from one JSONL file or a directory with one JSONL file per domain.

    ``path="builtin"`` reads the seeds shipped with selfmoe (:func:`builtin_seeds_dir`).

    - **File**: every record carries its ``domain``; records are grouped by it (file order kept).
    - **Directory**: every ``*.jsonl`` in it (not recursive) is one domain named by the file stem
      (``math.jsonl`` -> ``"math"``); a record's own ``domain``, if present, must equal the stem.

    ``domains`` keeps only those domains and fails if one is absent. Raises ``FileNotFoundError``
    (path missing, or a directory without ``*.jsonl``), :class:`DataFormatError` (``file:line``),
    ``ValueError`` (an empty domain or a requested domain that is not there).
    """
    p = builtin_seeds_dir() if os.fspath(path) == BUILTIN_SEEDS else pathlib.Path(path)
    out: Dict[str, List[Record]] = {}
    if p.is_dir():
        files = sorted(q for q in p.glob("*.jsonl") if q.is_file())
        if not files:
            raise FileNotFoundError(f"{os.fspath(path)}: directory holds no *.jsonl seed files")
        for q in files:
            recs = read_jsonl(q, domain=q.stem)
            if not recs:
                raise ValueError(f"{q}: seed file for domain {q.stem!r} holds no records")
            out[q.stem] = recs
    elif p.is_file():
        for rec in iter_jsonl(p):
            out.setdefault(rec["domain"], []).append(rec)
        if not out:
            raise ValueError(f"{os.fspath(path)}: seed file holds no records")
    else:
        import difflib

        hint = ""
        if difflib.get_close_matches(os.fspath(path).lower(), [BUILTIN_SEEDS], n=1, cutoff=0.7):
            hint = f"; did you mean {BUILTIN_SEEDS!r} (the seeds that ship with selfmoe)?"
        raise FileNotFoundError(f"{os.fspath(path)}: seeds not found (expected a .jsonl file or a directory of them, "
                                f"or {BUILTIN_SEEDS!r}){hint}")
    if domains is not None:
        missing = [d for d in domains if d not in out]
        if missing:
            raise ValueError(f"{os.fspath(path)}: no seeds for domain(s) {missing}; present: {sorted(out)}")
        out = {d: out[d] for d in domains}
    return out


# --------------------------------------------------------------------------------------------------
# Prompt and tokenisation


def format_prompt(instruction: str, input: str = "", *, fmt: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt for an instruction (and optional input).

    ``fmt="alpaca"`` (default): the Alpaca prompt, ending in ``"### Response:\\n"``. ``fmt="chat"``: the
    tokenizer's chat template with one user message (the instruction, then the input after a blank
    line) and the generation prompt. ``fmt="auto"``: chat when ``tokenizer`` has a chat template.
    See :mod:`selfmoe.prompt_format`.
    """
    if fmt != "alpaca":
        from .prompt_format import chat_prompt, resolve_prompt_format

        if resolve_prompt_format(fmt, tokenizer) == "chat":
            return chat_prompt(tokenizer, instruction, input or "")
    if input and input.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def encode_prompt(tokenizer: Any, text: str) -> List[int]:
    """Token ids of a prompt with the tokenizer's leading special tokens (BOS) but never a trailing EOS.

    Some tokenizers' post-processors append EOS when ``add_special_tokens=True``; a prompt that ends in
    EOS would tell the model the text is over before its answer starts. Both training and generation
    encode prompts through this function so they see the same ids.

    A text that already starts with the tokenizer's BOS string (chat templates that write it, like
    Llama 3's) is encoded without special tokens, so BOS is not doubled.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if isinstance(bos, str) and bos and text.startswith(bos):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    with_sp = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    core = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = len(core)
    if n and len(with_sp) >= n:
        for start in range(len(with_sp) - n + 1):
            if with_sp[start:start + n] == core:
                return with_sp[:start + n]  # keep the prefix (BOS ...), drop any suffix (EOS ...)
    return with_sp


def tokenize_example(record: Mapping[str, Any], tokenizer: Any, *, max_length: Optional[int] = None,
                     overflow: str = "truncate", prompt_format: str = "auto") -> Optional[Dict[str, List[int]]]:
    """``input_ids``, ``attention_mask`` and ``labels`` for one record; loss only on the response.

    ``labels`` is ``-100`` on every prompt token, the response ids followed by EOS elsewhere. The prompt
    plus response is tokenised as one text when that keeps the prompt's ids as a prefix (then the ids
    equal what a model sees when it generates after the prompt); when a tokenizer merges across the
    boundary, the two parts are tokenised separately and concatenated so the mask stays exact.

    ``prompt_format`` (``auto``/``chat``/``alpaca``, see :mod:`selfmoe.prompt_format`): with ``chat``
    the prompt is the chat template's user turn plus generation prompt and the response is the
    assistant turn as the template renders it, cut after its last EOS (the end-of-turn token, e.g.
    ``<|im_end|>``), or with EOS appended when the rendering holds none.

    ``max_length``: with ``overflow="truncate"`` the response is cut at the end (its EOS then goes too);
    with ``overflow="drop"`` an overlong example returns ``None``. An example whose prompt alone leaves
    no room for one response token returns ``None`` either way.
    """
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id: responses need an EOS to learn where to stop")
    from .prompt_format import resolve_prompt_format

    fmt = resolve_prompt_format(prompt_format, tokenizer)
    instruction, inp = record["instruction"], record.get("input", "") or ""
    if fmt == "chat":
        from .prompt_format import chat_target

        prompt = format_prompt(instruction, inp, fmt="chat", tokenizer=tokenizer)
        target = chat_target(tokenizer, instruction, inp, record["output"])
        response = record["output"] if target is None else target
    else:
        prompt = format_prompt(instruction, inp)
        response = record["output"]
    prompt_ids = encode_prompt(tokenizer, prompt)
    full_ids = encode_prompt(tokenizer, prompt + response)
    if len(full_ids) > len(prompt_ids) and full_ids[:len(prompt_ids)] == prompt_ids:
        response_ids = full_ids[len(prompt_ids):]
    else:
        response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if fmt == "chat" and eos in response_ids:
        last = len(response_ids) - 1 - response_ids[::-1].index(eos)
        response_ids = response_ids[:last + 1]  # through the end-of-turn token; what follows it is never generated
    else:
        response_ids = response_ids + [eos]
    ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    if max_length is not None and len(ids) > max_length:
        if overflow == "drop" or len(prompt_ids) >= max_length:
            return None
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


class SFTDataset(torch.utils.data.Dataset):
    """Tokenised records for supervised fine-tuning (see :func:`tokenize_example`).

    ``lengths[i]`` is the token count of example ``i`` (for :class:`LengthGroupedBatchSampler`);
    ``num_dropped`` counts records left out because they did not fit ``max_length``.
    ``prompt_format``: see :func:`tokenize_example` (``auto``: the chat template when the tokenizer has one).
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], tokenizer: Any, *, max_length: Optional[int] = None,
                 overflow: str = "truncate", progress: bool = False, prompt_format: str = "auto") -> None:
        from tqdm.auto import tqdm

        self.examples: List[Dict[str, List[int]]] = []
        self.num_dropped = 0
        for rec in tqdm(records, desc="tokenize", disable=not progress, unit="ex"):
            ex = tokenize_example(rec, tokenizer, max_length=max_length, overflow=overflow, prompt_format=prompt_format)
            if ex is None:
                self.num_dropped += 1
            else:
                self.examples.append(ex)
        self.lengths: List[int] = [len(ex["input_ids"]) for ex in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Dict[str, List[int]]:
        return self.examples[i]


class SFTCollator:
    """Right-pad a list of examples into ``input_ids``, ``attention_mask``, ``labels`` tensors.

    Padding gets ``pad_token_id`` in ``input_ids``, 0 in ``attention_mask`` and -100 in ``labels``.
    Right padding is what training wants: positions then start at 0 for every row without position ids.
    ``pad_to_multiple_of`` rounds the padded length up (tensor cores like multiples of 8).
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: Optional[int] = None) -> None:
        if not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> "SFTCollator":
        """Collator padding with the tokenizer's pad token, or its EOS when it has none (the mask hides it)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither pad_token_id nor eos_token_id to pad with")
        return cls(int(pad), **kwargs)

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> Dict[str, torch.Tensor]:
        if not features:
            raise ValueError("SFTCollator: empty batch")
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = int(math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        n = len(features)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[i, :k] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            attention[i, :k] = 1
            labels[i, :k] = torch.as_tensor(f["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of indices with similar lengths, so right padding stays small; deterministic per seed.

    Each epoch: shuffle all indices with ``numpy.random.default_rng([seed, epoch])``, cut them into
    groups of ``group_size`` (default ``50 * batch_size``), sort each group by length (longest first),
    cut the concatenation into batches, shuffle the batch order, and move the batch holding the longest
    example to the front (an out-of-memory error then shows up on the first step, not hours later).
    Every index appears exactly once per epoch (``drop_last`` drops only the final short batch).
    ``shuffle=False`` sorts the whole set by length (evaluation: least padding, fixed order).
    Call :meth:`set_epoch` before each epoch for a fresh order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, group_size: Optional[int] = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if group_size is not None and group_size < batch_size:
            raise ValueError(f"group_size ({group_size}) must be >= batch_size ({batch_size})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1:
            raise ValueError(f"lengths must be 1-D, got shape {self.lengths.shape}")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.group_size = group_size if group_size is not None else 50 * batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches(self) -> List[List[int]]:
        """This epoch's batches as lists of indices."""
        n = len(self.lengths)
        if n == 0:
            return []
        if not self.shuffle:
            # Stable sort (index order breaks ties) so the order never depends on the platform.
            order = np.argsort(-self.lengths, kind="stable")
        else:
            rng = np.random.default_rng([self.seed, self.epoch])
            perm = rng.permutation(n)
            parts = []
            for lo in range(0, n, self.group_size):
                g = perm[lo:lo + self.group_size]
                parts.append(g[np.argsort(-self.lengths[g], kind="stable")])
            order = np.concatenate(parts)
        batches = [order[i:i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle and len(batches) > 1:
            rng = np.random.default_rng([self.seed, self.epoch, 1])
            batches = [batches[i] for i in rng.permutation(len(batches))]
            longest = max(range(len(batches)), key=lambda b: int(self.lengths[batches[b]].max()))
            batches.insert(0, batches.pop(longest))
        return batches

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def padding_stats(lengths: Sequence[int], batches: Iterable[Sequence[int]]) -> Dict[str, float]:
    """Real and padding token counts when each batch is right-padded to its longest member."""
    lens = np.asarray(lengths, dtype=np.int64)
    real = pad = 0
    for b in batches:
        bl = lens[np.asarray(b, dtype=np.int64)]
        if bl.size:
            real += int(bl.sum())
            pad += int(bl.max() * bl.size - bl.sum())
    total = real + pad
    return {"real_tokens": real, "pad_tokens": pad, "pad_fraction": (pad / total) if total else 0.0}
