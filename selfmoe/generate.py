"""Batched text generation: Hugging Face ``generate`` with left padding, or vLLM when asked for.

Both backends take a list of prompt strings and a :class:`SamplingConfig` and return one
:class:`Completion` per prompt, in prompt order: only the newly generated text (prompt and special
tokens removed, cut before the first stop string) and why it ended (``"stop"``: EOS or a stop string;
``"length"``: ``max_new_tokens`` ran out, so the text may be cut mid-sentence).

The HF backend never changes the tokenizer: it pads on the left by itself (a decoder-only model
continues from the last position, so every prompt must end there), with the pad token or, if the
tokenizer has none, EOS (masked out either way). Prompts are sorted by length before batching to keep
padding low, and results are put back in order.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generator, Iterator, List, Optional, Protocol, Sequence, Tuple

import torch

from .data import encode_prompt

__all__ = ["SamplingConfig", "Completion", "TextGenerator", "HFGenerator", "VLLMGenerator", "GenerateCall",
           "GenerationTask", "run_tasks", "make_generator", "generate_texts", "vllm_available"]


@dataclass(frozen=True)
class SamplingConfig:
    """How to decode.

    ``do_sample=False`` is greedy (``temperature``/``top_p``/``top_k`` are then ignored). ``top_k=0``
    disables top-k (the Hugging Face default would otherwise be 50 in older versions; vLLM's is off).
    ``stop``: strings that end a completion; the returned text stops before the first one.
    ``seed``: makes sampling reproducible (HF: seeds a forked RNG, the caller's RNG state is untouched;
    vLLM: per-request seed).
    """

    max_new_tokens: int = 256
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Tuple[str, ...] = ()
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature} (use do_sample=False for greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")

    def replace(self, **changes: Any) -> "SamplingConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" or "length"


class TextGenerator(Protocol):
    """What the self-specialization pipeline needs from a backend."""

    def generate(self, prompts: Sequence[str], config: SamplingConfig, *, desc: Optional[str] = None) -> List[Completion]:
        ...


@dataclass(frozen=True)
class GenerateCall:
    """One ``generate`` call a :data:`GenerationTask` asks for."""

    prompts: Sequence[str]
    config: SamplingConfig
    desc: Optional[str] = None


#: A job that needs generations: a Python generator that yields a :class:`GenerateCall` and is sent its
#: completions (one per prompt, in order); it returns its result. It may also yield a list of calls: all of
#: them start, and it is sent the first one's completions as soon as they are ready while the others go on
#: in the background; yielding one of those later (the same object) gets its completions. Written this
#: way, several jobs can share one decode batch (:meth:`HFGenerator.run_tasks`) without threads.
GenerationTask = Generator[Any, Any, Any]


def run_tasks(generator: Any, tasks: Sequence[GenerationTask]) -> List[Any]:
    """Run ``tasks`` on ``generator``; returns their results in order. A generator with a ``run_tasks``
    method of its own (:class:`HFGenerator`) runs them side by side; any other runs them one after the
    other through its ``generate``. On an error or Ctrl-C every task is closed (its ``finally`` blocks run)."""
    if hasattr(generator, "run_tasks"):
        return generator.run_tasks(tasks)

    def answer(call: GenerateCall) -> List[Completion]:
        return generator.generate(call.prompts, call.config, desc=call.desc) if call.prompts else []

    results = []
    try:
        for task in tasks:
            try:
                request = next(task)
                while True:  # a list's background calls run when they are asked for (none is left unasked)
                    request = task.send(answer(request[0] if isinstance(request, list) else request))
            except StopIteration as stop:
                results.append(stop.value)
    finally:
        for task in tasks:
            task.close()
    return results


def _cut_at_stop(text: str, stop: Sequence[str]) -> Tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _eos_ids(model: Any, tokenizer: Any) -> List[int]:
    """EOS ids from the tokenizer and the model's generation config (Llama 3 style models list several)."""
    ids: List[int] = []
    for src in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if src is None:
            continue
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if int(i) not in ids:
                ids.append(int(i))
    return ids


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while generating, the caller's train/eval mode back afterwards; and the routed layers'
    stacked expert factors kept for the generation (:func:`selfmoe.decoding_cache.decode_cache`: the
    weights do not change while it runs)."""
    from .decoding_cache import decode_cache

    was_training = model.training
    model.eval()
    try:
        with decode_cache(model):
            yield
    finally:
        model.train(was_training)


class BatchedRunner:
    """A model and its tokenizer run over prompts ``batch_size`` at a time (optionally with a progress bar):
    the shared part of :class:`HFGenerator` and :class:`selfmoe.eval_loglik.LoglikScorer`."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int, progress: bool) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress


class HFGenerator(BatchedRunner):
    """Batched ``model.generate`` with left padding (see the module docstring).

    ``batch_size`` prompts per ``generate`` call; ``progress`` shows a tqdm bar over the sequences.
    ``prefix_cache``: run the token prefix that all prompts of a batch share once and reuse its KV
    cache (:mod:`selfmoe.prefix_cache`; same outputs up to float rounding). Off by default; ``True``
    turns it on where the model allows it (plain transformers causal LMs; not MiXSE or PEFT wrappers,
    which keep per-cache state). Prompts are then ordered by their tokens and batched by shared
    prefix (:func:`~selfmoe.prefix_cache.prefix_batches`) instead of by length, and a batch uses the
    shared prefix when it is at least ``min_shared_prefix`` tokens long.
    ``decode_loop``: decode in our own loop, where a row that finished (EOS or a stop string) leaves the
    batch and its cache at once (``generate`` computes it until the whole batch is done) and a queued
    prompt takes its place (continuous batching, :mod:`selfmoe.decode_engine`: ``batch_size`` rows at a
    time, across the batches of a call and, with :meth:`run_tasks`, across calls). Same outputs up to
    float rounding; on where the model allows it (as for ``prefix_cache``, which implies it).
    ``counters`` adds up, over calls: prompts, prompt tokens, prefill tokens actually computed,
    generated tokens, and decode row-steps computed (what a benchmark reports).
    ``row_listener``: when set, called with the indices (into ``prompts`` of the current ``generate``
    call) of the rows the model is about to run, at each batch's start and, in the decode loop,
    whenever rows left (e.g. :meth:`selfmoe.MiXSE.routing_stats_by_rows`); no shared-prefix prefill
    then, since a prefix runs as one row for all.
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, progress: bool = True,
                 sort_by_length: bool = True, prefix_cache: bool = False, min_shared_prefix: int = 32,
                 decode_loop: bool = False) -> None:
        super().__init__(model, tokenizer, batch_size=batch_size, progress=progress)
        from .prefix_cache import cache_layers_are_plain, supports_prefix_cache

        if min_shared_prefix < 1:
            raise ValueError(f"min_shared_prefix must be >= 1, got {min_shared_prefix}")
        self.sort_by_length = sort_by_length
        supported = supports_prefix_cache(model)
        self.prefix_cache = bool(prefix_cache) and supported
        self.decode_loop = (bool(decode_loop) or bool(prefix_cache)) and supported
        self.min_shared_prefix = min_shared_prefix
        self._plain_cache = self.decode_loop and cache_layers_are_plain(model)
        self.counters = {"prompts": 0, "prompt_tokens": 0, "prefill_tokens": 0, "generated_tokens": 0,
                         "decode_row_steps": 0}
        self.row_listener: Optional[Callable[[List[int]], None]] = None
        self.eos_ids = _eos_ids(model, tokenizer)
        if not self.eos_ids:
            raise ValueError("neither the tokenizer nor the model's generation_config has an eos_token_id")
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]

    def _generation_kwargs(self, config: SamplingConfig) -> dict:
        from transformers import GenerationConfig

        # A fresh GenerationConfig, so defaults shipped with a checkpoint (e.g. temperature 0.6) never
        # leak into the decoding the caller asked for.
        gc = dict(max_new_tokens=config.max_new_tokens, do_sample=config.do_sample,
                  pad_token_id=self.pad_id, eos_token_id=list(self.eos_ids))
        if config.do_sample:
            gc.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or None)
        kwargs: dict = {}
        if config.stop:
            # Stopping inside generate saves the tokens after a stop string (generate needs the tokenizer
            # to match strings against tokens); the text is cut at the first stop string afterwards too.
            gc["stop_strings"] = list(config.stop)
            kwargs["tokenizer"] = self.tokenizer
        kwargs["generation_config"] = GenerationConfig(**gc)
        return kwargs

    def _left_pad(self, seqs: Sequence[List[int]], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
                mask[i, width - len(s):] = 1
        return ids.to(device), mask.to(device)

    def _generate_batch(self, seqs: Sequence[List[int]], device: torch.device, config: SamplingConfig,
                        kwargs: dict, batch: Sequence[int] = ()) -> List[List[int]]:
        """The new tokens of each row of one batch (EOS kept where a row ended with it); ``batch``: the
        rows' prompt indices (for :attr:`row_listener`)."""
        from .prefix_cache import common_prefix_length

        self.counters["prompts"] += len(seqs)
        self.counters["prompt_tokens"] += sum(len(s) for s in seqs)
        listener = self.row_listener
        shared = common_prefix_length(seqs) if self.prefix_cache and len(seqs) > 1 and listener is None else 0
        if shared < self.min_shared_prefix:
            shared = 0
        on_rows = None
        if listener is not None:
            on_rows = lambda rows: listener([batch[j] for j in rows])  # noqa: E731
        if self.decode_loop:
            from .decode_loop import decode_shared_prefix

            width = max(len(s) for s in seqs) - shared
            self.counters["prefill_tokens"] += shared + len(seqs) * width
            rows, steps = decode_shared_prefix(
                self.model, self.tokenizer, seqs, shared, max_new_tokens=config.max_new_tokens, eos_ids=self.eos_ids,
                pad_id=self.pad_id, stop=config.stop, do_sample=config.do_sample, temperature=config.temperature,
                top_p=config.top_p, top_k=config.top_k, on_rows=on_rows)
            self.counters["decode_row_steps"] += steps
            return rows
        if on_rows is not None:  # generate keeps every row to the end
            on_rows(list(range(len(seqs))))
        ids, mask = self._left_pad(seqs, device)
        self.counters["prefill_tokens"] += ids.numel()  # padding is computed too
        gen = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        new = gen[:, ids.shape[1]:].cpu()
        self.counters["decode_row_steps"] += new.numel()  # generate computes finished rows until all are done
        return [self._trim(row.tolist()) for row in new]

    def _trim(self, row: List[int]) -> List[int]:
        """A row of ``generate`` output without the pads written after it finished (EOS kept). Only the
        trailing run of pads is cut: a pad token the model chose itself mid-row is part of its output."""
        for j, t in enumerate(row):
            if t in self.eos_ids:
                return row[:j + 1]
        end = len(row)
        while end and row[end - 1] == self.pad_id:
            end -= 1
        return row[:end]

    def _decode(self, row: List[int], config: SamplingConfig) -> Completion:
        finished = False
        for j, t in enumerate(row):
            if t in self.eos_ids:
                row, finished = row[:j], True
                break
        text = self.tokenizer.decode(row, skip_special_tokens=True)
        text, hit = _cut_at_stop(text, config.stop)
        return Completion(text, "stop" if (finished or hit) else "length")

    def _encode(self, prompts: Sequence[str]) -> List[List[int]]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        encoded = [encode_prompt(self.tokenizer, p) for p in prompts]
        empty = [i for i, e in enumerate(encoded) if not e]
        if empty:
            raise ValueError(f"prompt(s) {empty[:5]} encode to no tokens (an empty prompt without BOS cannot be continued)")
        return encoded

    @property
    def continuous(self) -> bool:
        """Whether calls run through continuous batching (:mod:`selfmoe.decode_engine`): the decode loop is
        on, the model's KV cache has plain layers only (no sliding window: the engine pads and merges rows
        itself) and no :attr:`row_listener` needs whole batches."""
        return self.decode_loop and self._plain_cache and self.row_listener is None

    def run_tasks(self, tasks: Sequence[GenerationTask]) -> List[Any]:
        """Run :data:`GenerationTask` s side by side: the prompts of every task's pending call share the
        decode batch (``batch_size`` rows), and when a call's last row finishes the task is resumed at once
        and its next call queued behind the others. Returns the tasks' results in order. The schedule
        depends only on the outputs, so a seeded run is reproducible. Without continuous batching
        (:attr:`continuous`) the tasks run one after the other. On an error or Ctrl-C every task is closed."""
        if not self.continuous:
            return run_tasks(_Sequential(self), tasks)
        from tqdm.auto import tqdm

        from .decode_engine import ContinuousBatcher, DecodeRequest

        engine = ContinuousBatcher(self.model, self.tokenizer, max_rows=self.batch_size, eos_ids=self.eos_ids,
                                   pad_id=self.pad_id, prefix_cache=self.prefix_cache,
                                   min_shared_prefix=self.min_shared_prefix, counters=self.counters)
        results: Dict[int, Any] = {}
        bar = tqdm(total=0, desc="generate", disable=not self.progress, unit="seq", leave=False)

        # Per call (by identity): its completions once answered, None while it runs; and which call each task waits for.
        answered: Dict[int, Tuple[GenerateCall, Optional[List[Completion]]]] = {}
        waiting: Dict[int, int] = {}

        def advance(n: int, sent: Any) -> None:
            try:
                request = next(tasks[n]) if sent is None else tasks[n].send(sent)
            except StopIteration as stop:
                results[n] = stop.value
                return
            calls = request if isinstance(request, list) else [request]
            for call in calls:
                if id(call) not in answered:
                    start(n, call)
            first = calls[0]
            if answered[id(first)][1] is not None:
                advance(n, answered.pop(id(first))[1])
            else:
                waiting[n] = id(first)

        def deliver(n: int, call: GenerateCall, completions: List[Completion]) -> None:
            answered[id(call)] = (call, completions)
            if waiting.get(n) == id(call):
                del waiting[n]
                advance(n, answered.pop(id(call))[1])

        def start(n: int, call: GenerateCall) -> None:
            encoded = self._encode(call.prompts)
            answered[id(call)] = (call, None if encoded else [])
            if not encoded:
                return
            self.counters["prompts"] += len(encoded)
            self.counters["prompt_tokens"] += sum(len(e) for e in encoded)
            bar.total += len(encoded)
            bar.set_description(call.desc or "generate")
            bar.refresh()
            config = call.config

            def done(rows: List[List[int]]) -> None:
                bar.update(len(rows))
                deliver(n, call, [self._decode(row, config) for row in rows])

            engine.submit(DecodeRequest(encoded, config.max_new_tokens, do_sample=config.do_sample,
                                        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                                        stop=config.stop, seed=config.seed, on_done=done))

        try:
            with _eval_mode(self.model), torch.no_grad():
                for n in range(len(tasks)):
                    advance(n, None)
                engine.run()
        finally:
            bar.close()
            for task in tasks:
                task.close()
        return [results[n] for n in range(len(tasks))]

    def generate(self, prompts: Sequence[str], config: SamplingConfig, *, desc: Optional[str] = None) -> List[Completion]:
        if self.continuous:
            def one() -> GenerationTask:
                return (yield GenerateCall(prompts, config, desc))
            return self.run_tasks([one()])[0]  # bad prompts raise when the call starts, before any decoding
        return self._generate_batches(prompts, config, desc=desc)

    def _generate_batches(self, prompts: Sequence[str], config: SamplingConfig, *, desc: Optional[str] = None
                          ) -> List[Completion]:
        """``generate`` batch by batch (``model.generate``, or the decode loop with a :attr:`row_listener`)."""
        from tqdm.auto import tqdm

        encoded = self._encode(prompts)
        if not encoded:
            return []
        order = list(range(len(prompts)))
        if self.prefix_cache:
            from .prefix_cache import prefix_batches

            batches = prefix_batches(encoded, self.batch_size, self.min_shared_prefix)
        else:
            if self.sort_by_length:
                order.sort(key=lambda i: -len(encoded[i]))  # longest first: an OOM shows up on the first batch
            batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        device = next(self.model.parameters()).device
        kwargs = self._generation_kwargs(config)
        out: List[Optional[Completion]] = [None] * len(prompts)
        devices = [device] if device.type == "cuda" else []
        # fork_rng: a seeded run must not reset the caller's global RNG stream.
        with torch.random.fork_rng(devices=devices, enabled=config.seed is not None), _eval_mode(self.model), torch.no_grad():
            if config.seed is not None:
                torch.manual_seed(config.seed)
            # Counted in sequences, not batches: a long round shows how far it is (leave=False: an outer bar,
            # e.g. specialize's pairs, stays on screen).
            bar = tqdm(total=len(prompts), desc=desc or "generate", disable=not self.progress, unit="seq", leave=False)
            for batch in batches:
                seqs = [encoded[i] for i in batch]
                rows = self._generate_batch(seqs, device, config, kwargs, batch)
                for row, i in zip(rows, batch):
                    out[i] = self._decode(row, config)
                    self.counters["generated_tokens"] += len(row)
                bar.update(len(batch))
            bar.close()
        return [c for c in out if c is not None]


class _Sequential:
    """An :class:`HFGenerator` seen through ``generate`` only (so :func:`run_tasks` drives tasks in turn)."""

    def __init__(self, inner: "HFGenerator") -> None:
        self.generate = inner._generate_batches


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install raising something else at import
        return False
    return True


class VLLMGenerator:
    """The same interface on vLLM (``pip install vllm``; needs a GPU). Untested here: no GPU in CI.

    ``model`` is a path or hub name that vLLM loads itself (it cannot share an HF model object), or a
    ready ``vllm.LLM``. ``llm_kwargs`` go to ``vllm.LLM`` (e.g. ``dtype``, ``gpu_memory_utilization``).
    vLLM schedules all prompts at once, so there is no batch size.
    """

    def __init__(self, model: Any, *, progress: bool = True, **llm_kwargs: Any) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ImportError("backend='vllm' needs the vllm package (pip install vllm)") from exc
        self._vllm = vllm
        self.llm = model if isinstance(model, vllm.LLM) else vllm.LLM(model=str(model), **llm_kwargs)
        self.progress = progress

    def generate(self, prompts: Sequence[str], config: SamplingConfig, *, desc: Optional[str] = None) -> List[Completion]:
        if not prompts:
            return []
        kw: dict = dict(n=1, max_tokens=config.max_new_tokens, seed=config.seed,
                        temperature=config.temperature if config.do_sample else 0.0)  # vLLM: 0 = greedy
        if config.stop:
            kw["stop"] = list(config.stop)
        if config.do_sample:
            kw["top_p"] = config.top_p
            if config.top_k:
                kw["top_k"] = config.top_k  # left out otherwise: vLLM's default is "off" in every version
        params = self._vllm.SamplingParams(**kw)
        outs = self.llm.generate(list(prompts), params, use_tqdm=self.progress)
        result = []
        for o in outs:
            c = o.outputs[0]
            text, _ = _cut_at_stop(c.text, config.stop)  # vLLM already drops the stop string; cheap to be sure
            result.append(Completion(text, "length" if c.finish_reason == "length" else "stop"))
        return result


def make_generator(model: Any, tokenizer: Any = None, *, backend: str = "hf", batch_size: int = 8,
                   progress: bool = True, **vllm_kwargs: Any) -> TextGenerator:
    """A generator for ``backend``: ``"hf"`` (model object + tokenizer), ``"vllm"`` (model path), or
    ``"auto"`` (vLLM when it is installed, CUDA is present and ``model`` is a path; HF otherwise)."""
    if backend == "auto":
        backend = "vllm" if (isinstance(model, str) and torch.cuda.is_available() and vllm_available()) else "hf"
    if backend == "vllm":
        return VLLMGenerator(model, progress=progress, **vllm_kwargs)
    if backend == "hf":
        if isinstance(model, str):
            raise TypeError("backend='hf' needs a loaded model object and its tokenizer, not a path")
        if tokenizer is None:
            raise ValueError("backend='hf' needs the tokenizer")
        return HFGenerator(model, tokenizer, batch_size=batch_size, progress=progress)
    raise ValueError(f"backend must be 'hf', 'vllm' or 'auto', got {backend!r}")


def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str], config: Optional[SamplingConfig] = None, *,
                   backend: str = "hf", batch_size: int = 8, progress: bool = True) -> List[str]:
    """Only the new text for each prompt (see :class:`HFGenerator` / :class:`VLLMGenerator`)."""
    gen = make_generator(model, tokenizer, backend=backend, batch_size=batch_size, progress=progress)
    return [c.text for c in gen.generate(prompts, config or SamplingConfig())]
