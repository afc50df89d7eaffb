"""Self-specialization: the base model writes its own instruction/response pairs for a domain.

Per round (paper defaults, all in :class:`SpecializeConfig`):

1. **Brainstorm**: ``prompts_per_round`` prompts, each the domain's instruction-writing header plus
   ``brainstorm_shots=3`` random seed instructions; sampled (temperature 1.0, top-p 0.98). The text
   before the next ``### Instruction``/``### Response`` mark is the new instruction (in the chat format,
   for domains whose seed instructions are one paragraph, also before the first blank line:
   ``one_paragraph_instructions``). With
   ``share_shots`` (default) the prompts of one generate batch share one random draw of seeds, so the
   generator runs their common prefix once (:mod:`selfmoe.prefix_cache`); the next batch draws again.
2. **Filter instructions** (:mod:`selfmoe.filters`): empty, short, long, unfinished, format-broken,
   exact/near copies of a seed or of an instruction kept earlier (or earlier in the same round).
3. **Respond**: the domain's expert system prompt, ``response_shots=5`` random seed pairs (shared per
   batch like the brainstorm's), the new instruction; greedy.
4. **Filter responses** (the text checks, then the domain-aware ones of :mod:`selfmoe.filters`: coding
   code must parse, optionally pass the instruction's asserts in the sandbox; multiple-choice answer
   letters stay balanced across the domain's file), then append the kept pairs to ``out_path`` (flushed and fsynced per round)
   and rewrite the stats file next to it.

Rounds repeat until ``num_pairs`` records are in the file or ``max_attempts`` instructions were
brainstormed in this call. The next round's brainstorm runs beside a round's responses (unless the
round may reach the target by itself), and :func:`specialize` runs its domains side by side: with the
HF generator they all share the continuous decode batch (:mod:`selfmoe.decode_engine`). Output format: one record per line, ``{"instruction", "input": "",
"output", "domain"}`` (:mod:`selfmoe.data`), so the file is training data as it stands.

**Resuming**: calling again with the same ``out_path`` continues: the records already there count
toward ``num_pairs`` and join the duplicate index, and an incomplete last line (a crash mid-write) is
dropped first. A file holding another domain's records is refused unless ``overwrite=True`` (which
starts over). Ctrl-C leaves every line written so far valid.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .names import check_safe_name
from .data import DataFormatError, append_jsonl, iter_json_lines, repair_jsonl_tail, validate_record
from .filters import AnswerBalance, FilterConfig, NearDuplicateIndex, check_domain, check_text, empty_stats, normalize_tokens
from .generate import GenerateCall, GenerationTask, HFGenerator, SamplingConfig, TextGenerator, run_tasks
from .prompt_format import check_prompt_format, resolve_prompt_format
from .prompts import (STOP_MARKS, TemplateSource, build_brainstorm_prompt, build_response_prompt, get_template,
                      load_templates, seed_instruction_text)

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["SpecializeConfig", "specialize_domain", "specialize", "stats_path", "parse_completion",
           "check_seed_counts", "brainstorm_sampling", "PARAGRAPH_STOP"]


def _brainstorm_default() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=256, do_sample=True, temperature=1.0, top_p=0.98, stop=STOP_MARKS)


def _response_default() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=512, do_sample=False, stop=STOP_MARKS)


@dataclass(frozen=True)
class SpecializeConfig:
    """Everything about a self-specialization run except the model, seeds, domain and target count.

    ``prompts_per_round``: instructions brainstormed per round (the unit of checkpointing).
    ``batch_size``: rows decoded at once when the pipeline builds the HF generator itself (continuous
    batching, shared by all domains of a :func:`specialize` call), and the size of a shared few-shot group.
    ``max_attempts``: most instructions brainstormed in one call; ``None`` = 20 x the pairs still
    missing (a model that writes nothing usable then stops instead of looping forever).
    ``seed``: the seed-example draws and the sampling; a run is reproducible given the seed (the
    ``seed`` fields of ``brainstorm``/``response`` are ignored: each round derives its own).
    ``templates``: overrides for :mod:`selfmoe.prompts` (dict or JSON file path).
    ``overwrite``: start over when ``out_path`` exists (required if it holds another domain).
    ``prompt_format``: ``auto`` (the tokenizer's chat template when it has one, else the Alpaca-style
    few-shot prompts), ``chat`` or ``alpaca`` (:mod:`selfmoe.prompts`, :mod:`selfmoe.prompt_format`).
    ``share_shots``: the prompts of each group of ``batch_size`` (one generate batch) share their
    random few-shot examples, so their long common prefix is computed once; ``False`` draws the
    examples per prompt (as Self-Instruct does; a few times more prefill on a CPU). Sampling itself
    (temperature, top-p, greedy responses) is the same either way.
    ``one_paragraph_instructions``: a brainstorm ends at its first blank line (the new instruction is
    one paragraph; :func:`brainstorm_sampling` adds ``"\\n\\n"`` to the brainstorm's stop strings).
    ``None`` (auto): on in the chat format for a domain whose seed instructions are all one paragraph
    (the built-in math, knowledge and reasoning seeds; not coding, whose instructions hold code and
    asserts). The chat prompt lists the examples as paragraphs and asks for one new instruction, and a
    small model that does not stop there goes on with an answer or more instructions until
    ``max_new_tokens``, and the instruction is then dropped as unfinished. A first paragraph that ends
    with a colon (a lead-in to what the stop cut off) counts as unfinished. The Alpaca format ends an
    instruction at its ``###`` marks, so auto leaves it off there.
    """

    brainstorm_shots: int = 3
    response_shots: int = 5
    brainstorm: SamplingConfig = field(default_factory=_brainstorm_default)
    response: SamplingConfig = field(default_factory=_response_default)
    prompts_per_round: int = 64
    batch_size: int = 16
    max_attempts: Optional[int] = None
    seed: int = 0
    filters: FilterConfig = field(default_factory=FilterConfig)
    templates: TemplateSource = None
    overwrite: bool = False
    progress: bool = True
    prompt_format: str = "auto"
    share_shots: bool = True
    one_paragraph_instructions: Optional[bool] = None

    def __post_init__(self) -> None:
        for name in ("brainstorm_shots", "response_shots", "prompts_per_round", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 or None, got {self.max_attempts}")
        check_prompt_format(self.prompt_format)

    @property
    def min_seeds(self) -> int:
        return max(self.brainstorm_shots, self.response_shots)


#: The stop string of a one-paragraph instruction (:attr:`SpecializeConfig.one_paragraph_instructions`).
PARAGRAPH_STOP = "\n\n"


def brainstorm_sampling(cfg: SpecializeConfig, seeds: Sequence[Mapping[str, Any]], fmt: str) -> SamplingConfig:
    """A domain's brainstorm settings: ``cfg.brainstorm``, with :data:`PARAGRAPH_STOP` added to its stop
    strings when instructions are one paragraph (``cfg.one_paragraph_instructions``; ``None``: the chat
    format ``fmt`` and no seed instruction with a blank line)."""
    on = cfg.one_paragraph_instructions
    if on is None:
        on = fmt == "chat" and not any(PARAGRAPH_STOP in seed_instruction_text(s).strip() for s in seeds)
    if not on or PARAGRAPH_STOP in cfg.brainstorm.stop:
        return cfg.brainstorm
    return cfg.brainstorm.replace(stop=tuple(cfg.brainstorm.stop) + (PARAGRAPH_STOP,))


def stats_path(out_path: PathLike) -> pathlib.Path:
    """Where the stats of ``out_path`` live: ``math.jsonl`` -> ``math.stats.json``."""
    p = pathlib.Path(out_path)
    stem = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return p.with_name(stem + ".stats.json")


# What a chat model may put before the instruction it was asked for: a list number ("4. "), a bullet,
# a label ("New instruction:"), a leading Alpaca mark ("### Instruction:").
_CHAT_LEAD = re.compile(r"^\s*(?:###\s*)?(?:(?:new\s+)?instruction\s*(?:\d+\s*)?:\s*|\d{1,3}[.)]\s+|[-*\u2022]\s+)",
                        re.IGNORECASE)


def parse_completion(text: str, *, fmt: str = "alpaca", kind: str = "response") -> str:
    """The usable part of a completion: text before the next prompt section mark, stripped.

    Backends already stop at these marks; cutting again makes a custom backend that ignores ``stop``
    safe. Garbage is returned as-is (the filters judge it), never raises. ``fmt="chat"`` and
    ``kind="instruction"`` (a brainstormed instruction in the chat format): a leading list number,
    bullet or "Instruction:" label is removed first (the chat turn itself ends at the model's
    end-of-turn token, which the backend stops at and drops).
    """
    if fmt == "chat" and kind == "instruction":
        text = _CHAT_LEAD.sub("", text, count=1)
    cut = min((i for i in (text.find(m) for m in STOP_MARKS) if i >= 0), default=len(text))
    return text[:cut].strip()


def check_seed_counts(seeds_by_domain: Mapping[str, Sequence[Any]], config: SpecializeConfig) -> None:
    """Fail early, naming the domain and the counts, when a domain has too few seeds for the shots."""
    for domain, seeds in seeds_by_domain.items():
        if len(seeds) < config.min_seeds:
            raise ValueError(
                f"domain {domain!r} has {len(seeds)} seed(s), but brainstorm_shots={config.brainstorm_shots} and "
                f"response_shots={config.response_shots} need at least {config.min_seeds} distinct seeds in context")


def _validated_seeds(seeds: Sequence[Mapping[str, Any]], domain: str) -> List[Dict[str, Any]]:
    out = []
    for i, s in enumerate(seeds):
        try:
            out.append(validate_record(s, require_domain=False))
        except DataFormatError as exc:
            raise DataFormatError(f"seeds for domain {domain!r}, item {i}: {exc}") from None
    return out


def _scan_existing(path: pathlib.Path, domain: str) -> List[Dict[str, Any]]:
    """Records already in ``path`` (all of ``domain``), read before anything in the file is changed.

    A final line without its newline that does not parse is a crash remnant: ignored here, removed by
    :func:`repair_jsonl_tail` once we know the file is ours. Any other bad line is an error with its
    line number (the file is not something we wrote, or it was edited).
    """
    if not path.exists():
        return []
    if not path.is_file():
        raise IsADirectoryError(f"{path}: output path exists and is not a file")
    records: List[Dict[str, Any]] = []
    for lineno, obj in iter_json_lines(path, skip_torn_tail=True):
        rec = validate_record(obj, path=path, line=lineno)
        if rec["domain"] != domain:
            raise ValueError(
                f"{path}:{lineno}: output file holds records of domain {rec['domain']!r}, not {domain!r}; "
                f"refusing to append (pass overwrite=True to replace it)")
        records.append(rec)
    return records


def _load_stats(path: pathlib.Path, domain: str) -> Dict[str, Any]:
    try:
        st = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}  # stats are a report, not the source of truth (the JSONL is): start them afresh
    return st if isinstance(st, dict) and st.get("domain") == domain else {}


def _write_stats(path: pathlib.Path, stats: Mapping[str, Any]) -> None:
    from .io_utils import atomic_write_json

    atomic_write_json(path, dict(stats))


def specialize_domain(model: Any, tokenizer: Any, seeds: Sequence[Mapping[str, Any]], domain: str, out_path: PathLike,
                      num_pairs: int = 5000, *, config: Optional[SpecializeConfig] = None,
                      generator: Optional[TextGenerator] = None, **overrides: Any) -> Dict[str, Any]:
    """Generate (or continue generating) ``num_pairs`` filtered pairs for one domain into ``out_path``.

    ``model``/``tokenizer``: the base model and its tokenizer (HF backend). ``generator``: any
    :class:`~selfmoe.generate.TextGenerator` instead (e.g. vLLM); ``model`` may then be ``None``, and
    ``tokenizer`` is only used to count tokens for the length filters (whitespace words without it).
    ``overrides``: fields of :class:`SpecializeConfig` (e.g. ``max_attempts=50, overwrite=True``).

    Returns the stats dict (also written to :func:`stats_path`): ``kept`` records in the file,
    ``written`` this call, ``removed`` per filter (cumulative over resumed calls), ``attempts``,
    ``complete``. Warns (does not raise) when ``max_attempts`` ran out first.
    """
    cfg = dataclasses.replace(config or SpecializeConfig(), **overrides)
    if not isinstance(domain, str) or not domain.strip():
        raise ValueError(f"domain must be a non-empty string, got {domain!r}")
    return _run_domains(model, tokenizer, generator, {domain: seeds}, {domain: out_path}, num_pairs, cfg,
                        progress=cfg.progress)[domain]


def _run_domains(model: Any, tokenizer: Any, generator: Optional[TextGenerator],
                 seeds_by_domain: Mapping[str, Sequence[Mapping[str, Any]]], out_paths: Mapping[str, PathLike],
                 num_pairs: int, cfg: SpecializeConfig, *, progress: bool) -> Dict[str, Dict[str, Any]]:
    """The common part of :func:`specialize_domain` and :func:`specialize`: check the pair count and every
    domain's seeds before anything runs, build the HF generator unless one is given (``progress``: its own
    bar), run the domains as tasks side by side (with continuous batching, one domain's responses fill the
    places another's finished brainstorms left; any other generator runs them one after the other), and
    warn for each domain that stopped short."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    seeds = {d: _validated_seeds(s, d) for d, s in seeds_by_domain.items()}
    check_seed_counts(seeds, cfg)
    if generator is None:
        if model is None or tokenizer is None:
            raise ValueError("pass model and tokenizer, or a generator")
        generator = HFGenerator(model, tokenizer, batch_size=cfg.batch_size, progress=progress,
                                prefix_cache=cfg.share_shots)
    several = len(seeds) > 1
    tasks = [_domain_task(tokenizer, seeds[d], d, out_paths[d], num_pairs, cfg, bar_position=n if several else None)
             for n, d in enumerate(seeds)]
    out = {}
    for d, result in zip(seeds, run_tasks(generator, tasks)):  # a loop, not a comprehension: the warnings'
        out[d] = _warn_incomplete(*result)                        # stacklevel reaches the public caller
    return out


def _domain_task(tokenizer: Any, seeds: List[Dict[str, Any]], domain: str, out_path: PathLike, num_pairs: int,
                 cfg: SpecializeConfig, bar_position: Optional[int] = None) -> GenerationTask:
    """:func:`specialize_domain`'s work after the argument checks, as a :data:`~selfmoe.generate.GenerationTask`
    (it yields its generate calls), so that several domains can share the decode batches. Returns the stats
    and the attempts made in this call."""
    template = get_template(domain, load_templates(cfg.templates))
    fmt = resolve_prompt_format(cfg.prompt_format, tokenizer)
    cfg = dataclasses.replace(cfg, brainstorm=brainstorm_sampling(cfg, seeds, fmt))
    count_tokens = (lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])) if tokenizer is not None else None

    out = pathlib.Path(out_path)
    spath = stats_path(out)
    had_output = out.is_file()
    if cfg.overwrite:
        if out.is_dir():
            raise IsADirectoryError(f"{out}: output path exists and is not a file")
        out.unlink(missing_ok=True)
        spath.unlink(missing_ok=True)
        existing: List[Dict[str, Any]] = []
    else:
        existing = _scan_existing(out, domain)
    out.parent.mkdir(parents=True, exist_ok=True)
    repaired = repair_jsonl_tail(out)
    out.touch()  # the output exists after every run, even one that kept nothing

    # Stats left from a deleted output describe data that is gone: start them afresh.
    prev = _load_stats(spath, domain) if had_output else {}
    removed = empty_stats()
    for k, v in (prev.get("removed") or {}).items():
        if k in removed and isinstance(v, int):
            removed[k] = v
    stats: Dict[str, Any] = {
        "domain": domain, "target": num_pairs, "output": str(out), "kept": len(existing), "written": 0,
        "removed": removed, "attempts": int(prev.get("attempts", 0)), "surplus": int(prev.get("surplus", 0)),
        "rounds": int(prev.get("rounds", 0)),
        "runs": int(prev.get("runs", 0)) + 1, "repaired_bytes": int(prev.get("repaired_bytes", 0)) + repaired,
        "complete": len(existing) >= num_pairs, "seeds": len(seeds),
        # JSON round trip (tuples -> lists) so the returned dict equals the one on disk.
        "config": json.loads(json.dumps({
            "brainstorm_shots": cfg.brainstorm_shots, "response_shots": cfg.response_shots,
            "brainstorm": dataclasses.asdict(cfg.brainstorm), "response": dataclasses.asdict(cfg.response),
            "filters": dataclasses.asdict(cfg.filters), "seed": cfg.seed, "prompt_format": fmt})),
    }

    index = NearDuplicateIndex(cfg.filters.near_dup_threshold)
    for s in seeds:
        index.add(normalize_tokens(seed_instruction_text(s)), "seed")
    for r in existing:
        index.add(normalize_tokens(seed_instruction_text(r)), "generated")
    # Option letters of the kept multiple-choice answers: the file so far, then each written round.
    balance = AnswerBalance(cfg.filters.max_answer_letter_share, cfg.filters.answer_balance_min_kept)
    for r in existing:
        balance.add(balance.letter(seed_instruction_text(r), r["output"]))

    budget = cfg.max_attempts if cfg.max_attempts is not None else 20 * max(0, num_pairs - len(existing))
    attempts_this_call = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=num_pairs, initial=min(len(existing), num_pairs), desc=f"specialize {domain}",
               disable=not cfg.progress, unit="pair", position=bar_position)
    t0 = time.time()
    dropped_before, kept_before, warned_slow = sum(removed.values()), stats["kept"], False
    # One RNG per round, keyed by the round's number in this call and the file size at the call's start: a
    # resumed run continues with fresh draws instead of replaying the first rounds (which the duplicate filter
    # would eat), and a round's draws never wait for the previous round's results.
    rounds_before, kept_at_start = stats["rounds"], stats["kept"]

    def brainstorm(i: int, k: int) -> Tuple[random.Random, int, GenerateCall]:
        rng = random.Random(f"{cfg.seed}:{domain}:{rounds_before + i}:{kept_at_start}")
        return rng, k, _brainstorm_call(template, seeds, cfg, rng, k, domain, fmt, tokenizer)

    try:
        current = brainstorm(0, min(cfg.prompts_per_round, budget)) if stats["kept"] < num_pairs and budget > 0 else None
        comps = (yield current[2]) if current is not None else []
        i = 0
        while current is not None:
            rng, k, _ = current
            # The round counts its drops separately and they are merged only once its records are on
            # disk: a round cut short by Ctrl-C leaves no trace, so attempts = kept + removed + surplus.
            round_removed = empty_stats()
            local_balance = balance.copy()
            instructions = _filter_instructions(comps, cfg, index, round_removed, count_tokens, fmt)
            # The next round's brainstorm runs beside this round's responses (yielded with them, it goes on in
            # the background; its instructions are judged once this round's records are in), unless this round
            # may reach the target by itself: a brainstorm run ahead is never thrown away.
            left = budget - attempts_this_call - k
            needed = num_pairs - stats["kept"]
            ahead = brainstorm(i + 1, min(cfg.prompts_per_round, left)) if left > 0 and len(instructions) < needed else None
            new: List[Dict[str, Any]] = []
            if instructions:
                respond = _response_call(template, seeds, cfg, rng, instructions, domain, fmt, tokenizer)
                answers = yield [respond] + ([ahead[2]] if ahead is not None else [])
                new = _filter_responses(instructions, answers, cfg, domain, fmt, round_removed, count_tokens, local_balance)
            # Pairs beyond the target are discarded but counted, so attempts = kept + removed + surplus.
            stats["surplus"] += max(0, len(new) - (num_pairs - stats["kept"]))
            new = new[: num_pairs - stats["kept"]]
            append_jsonl(out, new)  # records first, stats second: the JSONL is the truth on a crash
            for r in new:
                index.add(normalize_tokens(r["instruction"]), "generated")
                balance.add(balance.letter(r["instruction"], r["output"]))
            for key, v in round_removed.items():
                removed[key] += v
            attempts_this_call += k
            stats["attempts"] += k
            stats["rounds"] += 1
            stats["kept"] += len(new)
            stats["written"] += len(new)
            stats["complete"] = stats["kept"] >= num_pairs
            stats["seconds"] = round(time.time() - t0, 3)
            _write_stats(spath, stats)
            bar.update(len(new))
            # This run's counts only (the stats file keeps the totals over resumed runs).
            bar.set_postfix(attempts=attempts_this_call, dropped=sum(removed.values()) - dropped_before)
            if not warned_slow and stats["kept"] < num_pairs:
                warned_slow = _warn_if_slow(domain, time.time() - t0, stats["kept"] - kept_before, attempts_this_call,
                                            num_pairs - stats["kept"])
            if stats["kept"] >= num_pairs or attempts_this_call >= budget:
                break
            if ahead is None:  # not run beside the responses: brainstorm now
                ahead = brainstorm(i + 1, min(cfg.prompts_per_round, budget - attempts_this_call))
            current, i = ahead, i + 1
            comps = yield current[2]  # at once if it already ran beside the responses
    finally:
        bar.close()
        stats["seconds"] = round(time.time() - t0, 3)
        _write_stats(spath, stats)  # also on Ctrl-C: the report matches what is on disk
    return stats, attempts_this_call


def _warn_incomplete(stats: Mapping[str, Any], attempts_this_call: int) -> Dict[str, Any]:
    """Warn (in the caller of the public function) when a domain stopped short of its target; returns the stats."""
    if not stats["complete"]:
        warnings.warn(f"domain {stats['domain']!r}: {stats['kept']}/{stats['target']} pairs after {attempts_this_call} "
                      f"attempts (max_attempts reached); call again to continue. Filter counts: "
                      f"{ {k: v for k, v in stats['removed'].items() if v} }", RuntimeWarning, stacklevel=4)
    return dict(stats)


SLOW_WARNING_SECONDS = 3600.0


def _warn_if_slow(domain: str, elapsed: float, kept: int, attempts: int, remaining: int) -> bool:
    """After a round: when the speed so far implies more than an hour for the remaining pairs, say so once
    (with the measured rate) instead of letting a run sit silently for hours. Returns whether it warned."""
    per_pair = elapsed / kept if kept else elapsed / max(attempts, 1) * 20  # nothing kept yet: a pessimistic guess
    eta = per_pair * remaining
    if eta < SLOW_WARNING_SECONDS:
        return False
    warnings.warn(
        f"domain {domain!r}: at the speed so far ({elapsed:.0f} s for {kept} kept pair(s), {attempts} attempt(s)) the "
        f"remaining {remaining} pairs need about {eta / 3600:.1f} h; fewer pairs (--num-pairs), shorter generations "
        "(--response-max-new-tokens, --brainstorm-max-new-tokens) or a GPU make it shorter. Ctrl-C keeps what is "
        "written; rerun the same command to continue.", RuntimeWarning, stacklevel=4)
    return True


def _draw_shots(rng: random.Random, seeds: Sequence[Dict[str, Any]], shots: int, count: int,
                cfg: SpecializeConfig) -> List[List[Dict[str, Any]]]:
    """Few-shot examples for ``count`` prompts: one random draw per group of ``cfg.batch_size`` prompts
    with ``share_shots`` (a batch then shares its prompt prefix), else one draw per prompt."""
    group = cfg.batch_size if cfg.share_shots else 1
    draws: List[List[Dict[str, Any]]] = []
    for i in range(count):
        if i % group == 0:
            current = rng.sample(list(seeds), shots)
        draws.append(current)
    return draws


def _brainstorm_call(template: Any, seeds: Sequence[Dict[str, Any]], cfg: SpecializeConfig, rng: random.Random,
                     k: int, domain: str, fmt: str, tokenizer: Any) -> GenerateCall:
    """A round's brainstorm: ``k`` prompts with few-shot seeds drawn from ``rng`` (then its sampling seed)."""
    prompts = [build_brainstorm_prompt(template, shots, fmt=fmt, tokenizer=tokenizer)
               for shots in _draw_shots(rng, seeds, cfg.brainstorm_shots, k, cfg)]
    return GenerateCall(prompts, cfg.brainstorm.replace(seed=rng.getrandbits(31)), f"{domain}: instructions")


def _filter_instructions(comps: Sequence[Any], cfg: SpecializeConfig, index: NearDuplicateIndex,
                         removed: Dict[str, int], count_tokens: Any, fmt: str) -> List[Tuple[str, List[str]]]:
    """The brainstormed instructions that pass the filters, with their normalised tokens; counts the drops.

    Duplicates within the round are checked against a round-local index, so an instruction whose
    response is later dropped does not block its near-copies in later rounds."""
    fc = cfg.filters
    local = NearDuplicateIndex(fc.near_dup_threshold)
    one_paragraph = PARAGRAPH_STOP in cfg.brainstorm.stop
    instructions: List[Tuple[str, List[str]]] = []
    for c in comps:
        text = parse_completion(c.text, fmt=fmt, kind="instruction")
        finished = c.finish_reason == "stop"
        if one_paragraph and text.rstrip().endswith(":"):
            # A lead-in ("Here are two new problems:") whose content the paragraph stop cut off: unfinished.
            finished = False
        reason = check_text(text, "instruction", fc, finished=finished, count_tokens=count_tokens)
        toks = normalize_tokens(text)
        if reason is None:
            reason = index.check(toks) or local.check(toks)
        if reason is not None:
            removed[reason] += 1
            continue
        local.add(toks, "generated")
        instructions.append((text, toks))
    return instructions


def _response_call(template: Any, seeds: Sequence[Dict[str, Any]], cfg: SpecializeConfig, rng: random.Random,
                   instructions: Sequence[Tuple[str, List[str]]], domain: str, fmt: str, tokenizer: Any) -> GenerateCall:
    """A round's responses: the expert prompt with seed pairs drawn from the round's ``rng``, greedy."""
    prompts = [build_response_prompt(template, shots, text, fmt=fmt, tokenizer=tokenizer)
               for (text, _), shots in zip(instructions, _draw_shots(rng, seeds, cfg.response_shots, len(instructions), cfg))]
    return GenerateCall(prompts, cfg.response.replace(seed=rng.getrandbits(31)), f"{domain}: responses")


def _filter_responses(instructions: Sequence[Tuple[str, List[str]]], answers: Sequence[Any], cfg: SpecializeConfig,
                      domain: str, fmt: str, removed: Dict[str, int], count_tokens: Any,
                      local_balance: AnswerBalance) -> List[Dict[str, Any]]:
    """The round's kept records (not yet written). ``local_balance``: the domain's kept answer letters (a copy:
    the caller adds the records it writes); the round judges its pairs against it plus the pairs it kept
    before them."""
    fc = cfg.filters
    kept = []
    for (text, _), a in zip(instructions, answers):
        resp = parse_completion(a.text, fmt=fmt)
        finished = a.finish_reason == "stop"
        reason = check_text(resp, "response", fc, finished=finished, count_tokens=count_tokens)
        if reason is None:
            reason = check_domain(domain, text, resp, fc, local_balance, finished=finished)
        if reason is not None:
            removed[reason] += 1
            continue
        local_balance.add(local_balance.letter(text, resp))
        kept.append({"instruction": text, "input": "", "output": resp, "domain": domain})
    return kept


def specialize(model: Any, tokenizer: Any, seeds_by_domain: Mapping[str, Sequence[Mapping[str, Any]]],
               out_dir: PathLike, num_pairs: int = 5000, *, domains: Optional[Sequence[str]] = None,
               config: Optional[SpecializeConfig] = None, generator: Optional[TextGenerator] = None,
               **overrides: Any) -> Dict[str, Dict[str, Any]]:
    """:func:`specialize_domain` for every domain: ``out_dir/<domain>.jsonl`` and ``<domain>.stats.json``.

    ``domains`` picks and orders the domains (default: all in ``seeds_by_domain``). Seed counts of all
    of them are checked before any generation starts. Returns ``{domain: stats}``.
    """
    cfg = dataclasses.replace(config or SpecializeConfig(), **overrides)
    names = list(domains) if domains is not None else list(seeds_by_domain)
    for d in names:  # each becomes out_dir/<domain>.jsonl: never a path of its own
        check_safe_name(d, "domain")
    missing = [d for d in names if d not in seeds_by_domain]
    if missing:
        raise ValueError(f"no seeds for domain(s) {missing}; seeds are given for {sorted(seeds_by_domain)}")
    if not names:
        raise ValueError("no domains to specialize")
    out_root = pathlib.Path(out_dir)  # each domain's task creates it once the checks passed
    return _run_domains(model, tokenizer, generator, {d: seeds_by_domain[d] for d in names},
                        {d: out_root / f"{d}.jsonl" for d in names}, num_pairs, cfg, progress=False)
