"""Training loops: one LoRA expert per domain, the instance-merging baseline, and the MiXSE router.

One loop (:func:`fit`), three uses:

- :func:`train_expert` — a plain LoRA (rank 8, alpha 16, every linear of the decoder layers; the paper's
  setup) on one domain's records, saved as a PEFT adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``). A single expert needs no router, so it is trained as a plain
  :class:`~selfmoe.lora.LoRALinear` per module, not as a one-expert MiXSE.
- the **instance-merging** baseline — :func:`train_expert` on the union of every domain's records.
- :func:`train_router` — :meth:`MiXSE.from_adapters` with base and experts frozen; only the router
  learns, on the union data; saved with :meth:`MiXSE.save_pretrained`. ``output.aux_loss`` (when an
  auxiliary router loss is configured) is added to the LM loss.

The loss is the token-level cross-entropy on response tokens, summed over the whole effective batch and
divided by its number of target tokens (so gradient accumulation and several processes give the same
update as one big batch).

Each run writes one output directory (layout, refusals and the log: :mod:`selfmoe.run_dir`) with
checkpoints in it (:mod:`selfmoe.checkpoints`). ``resume=True`` continues from the newest usable
checkpoint and gives bit-identical weights to an uninterrupted run on the same device (the RNG states
and the position in the epoch are restored, the already-seen micro-batches skipped). A step's log line
is written before its checkpoint, and resuming cuts the log back to the checkpoint's step, so the log
holds every step exactly once. Ctrl-C stops at the end of the current micro-batch (twice: at once),
writes a checkpoint of the last completed step and raises :class:`TrainingInterrupted` (a
``KeyboardInterrupt``). A NaN/inf loss or gradient norm stops before the update with
:class:`NonFiniteLossError`, naming the step; the last good checkpoint stays as it was and no final
model is written.

Multi-GPU (:mod:`selfmoe.train_runtime`): every process reads the same deterministic list of
micro-batches and takes its share, so no sampler needs preparing; the gradients of the trainable
parameters are all-reduced once per optimizer step (DDP, skipped on the accumulation micro-batches), and
the step's loss sums, token counts and Ctrl-C requests travel in one more all-reduce. Only rank 0 writes
the log, checkpoints and the final model. Ctrl-C (any process, or the launcher) stops every process at the
end of the same step with one checkpoint; a process that dies or hangs makes the others raise
:class:`DistributedError` after the collective timeout.

This module also re-exports (``__all__``) the names that were defined here before the layer, the data
loading, the config and errors, the runtime, the run directory and the checkpoints got their own modules,
so ``from selfmoe.train import ...`` keeps working; new code imports them from where they live.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from . import checkpoints
from .adapters import ADAPTER_WEIGHTS_NAME, save_lora_adapter
from .checkpoints import (CHECKPOINT_FILES, MANIFEST_NAME, OPTIMIZER_NAME, RNG_NAME, SCHEDULER_NAME, TRAINABLE_NAME,
                          TRAINER_STATE_NAME, trainable_parameters)
from .data import LengthGroupedBatchSampler, PathLike, Record, SFTCollator, SFTDataset
from .lm_loss import evaluate_loss, response_tokens_per_example, token_loss_sum
from .lora import LoRALinear, add_lora, attach_lora_adapter, lora_weights, remove_lora
from .model import MiXSE
from .prompt_format import resolve_prompt_format
from .routers import check_top_k
from .run_dir import (CHECKPOINT_DIR, FINAL_NAMES, LOG_NAME, RUN_CONFIG_NAME, RUN_NAMES, append_log, base_signature,
                      data_info, file_sha256, prepare_output_dir, publish, run_record, truncate_log)
from .train_config import (BOOKKEEPING_FIELDS, PRECISIONS, SCHEDULERS, CheckpointError, DistributedError,
                           NonFiniteLossError, TrainConfig, TrainingInterrupted, TrainResult, TrainState)
from .train_data import load_records, select_domain
from .train_runtime import (COLLECTIVE_TIMEOUT_ENV, InterruptGuard, SingleProcess, capture_rng, collective_failure,
                            collective_timeout, make_runtime, set_seed)

Callback = Callable[["TrainState", nn.Module], None]

__all__ = [
    # defined here
    "fit",
    "train_expert",
    "train_router",
    "Callback",
    # re-exported (they were defined here before)
    "TrainConfig",
    "TrainState",
    "TrainResult",
    "TrainingInterrupted",
    "NonFiniteLossError",
    "CheckpointError",
    "DistributedError",
    "LoRALinear",
    "add_lora",
    "attach_lora_adapter",
    "remove_lora",
    "lora_weights",
    "load_records",
    "select_domain",
    "set_seed",
    "token_loss_sum",
    "evaluate_loss",
    "RUN_CONFIG_NAME",
    "LOG_NAME",
    "CHECKPOINT_DIR",
    "TRAINER_STATE_NAME",
    "TRAINABLE_NAME",
    "OPTIMIZER_NAME",
    "SCHEDULER_NAME",
    "RNG_NAME",
    "MANIFEST_NAME",
    "CHECKPOINT_FILES",
    "FINAL_NAMES",
    "RUN_NAMES",
    "SCHEDULERS",
    "PRECISIONS",
    "BOOKKEEPING_FIELDS",
    "PathLike",
    "Record",
]


# ----------------------------------------------------------------------------------------------------
# The loop


@dataclass(frozen=True)
class _Plan:
    micro_per_step: int  # global micro-batches per optimizer step
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def _make_plan(num_examples: int, config: TrainConfig, world_size: int) -> _Plan:
    if config.batch_size % (config.micro_batch_size * world_size):
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of micro_batch_size x processes = "
                         f"{config.micro_batch_size} x {world_size}")
    if num_examples == 0:
        raise ValueError("no training examples (every record was dropped or the data is empty)")
    group = config.batch_size // config.micro_batch_size
    n_micro = -(-num_examples // config.micro_batch_size)
    rem = n_micro % group
    rem -= rem % world_size  # every process must run the same number of micro-batches
    steps_per_epoch = n_micro // group + (1 if rem else 0)
    if steps_per_epoch == 0:
        raise ValueError(f"{num_examples} examples give fewer micro-batches than the {world_size} processes")
    total = config.max_steps if config.max_steps is not None else steps_per_epoch * config.num_epochs
    warm = config.warmup_steps if config.warmup_steps is not None else math.ceil(config.warmup_ratio * total)
    return _Plan(group, steps_per_epoch, total, min(warm, total))


def _lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        # (step + 1) / (warmup + 1): the first step already learns a little (HF's step / warmup wastes it).
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _epoch_groups(sampler: LengthGroupedBatchSampler, epoch: int, plan: _Plan, world: int) -> List[List[List[int]]]:
    """The epoch's micro-batches (global, deterministic) cut into optimizer steps."""
    sampler.set_epoch(epoch)
    batches = sampler.batches()
    groups = [batches[i:i + plan.micro_per_step] for i in range(0, len(batches), plan.micro_per_step)]
    if groups and len(groups[-1]) % world:
        groups[-1] = groups[-1][: len(groups[-1]) - len(groups[-1]) % world]
    return [g for g in groups if g]


def _enable_gradient_checkpointing(model: nn.Module) -> Callable[[], None]:
    target = model.base_model if isinstance(model, MiXSE) else model
    # Non-reentrant: the frozen base's inputs need no requires_grad trick, and LoRA/router grads flow.
    kwargs = {"use_reentrant": False}
    if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.x name
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        return target.activation_checkpointing_disable
    if hasattr(target, "gradient_checkpointing_enable"):
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return target.gradient_checkpointing_disable
    warnings.warn(f"{type(target).__name__} supports no gradient checkpointing; training without it", RuntimeWarning)
    return lambda: None


class _Loop:
    """State and steps of one :func:`fit` call (internal)."""

    def __init__(self, model: nn.Module, tokenizer: Any, dataset: SFTDataset, out: pathlib.Path, config: TrainConfig,
                 record: Dict[str, Any], runtime: SingleProcess, callbacks: Sequence[Callback]) -> None:
        self.raw_model = model
        self.dataset = dataset
        self.out = out
        self.config = config
        self.record = record
        self.rt = runtime
        self.callbacks = list(callbacks)
        self.collate = SFTCollator.for_tokenizer(tokenizer)
        self.targets = response_tokens_per_example(dataset)
        self.plan = _make_plan(len(dataset), config, runtime.world_size)
        self.sampler = LengthGroupedBatchSampler(dataset.lengths, config.micro_batch_size, seed=config.seed, shuffle=True)
        self.state = TrainState(total_steps=self.plan.total_steps, world_size=runtime.world_size)
        self.checkpoint: Optional[pathlib.Path] = None
        self.history: List[Dict[str, Any]] = []
        self.consistent = True  # False while an optimizer update is half applied
        # Several processes: a Ctrl-C reaches each twice (terminal + launcher); 2 s apart is still one press.
        self.guard = InterruptGuard(same_press=2.0 if runtime.world_size > 1 else 0.0)
        self.agreed_stop = False  # every process stops at this step (multi-process Ctrl-C)
        self._window = {"loss": 0.0, "aux": 0.0, "targets": 0, "tokens": 0, "seconds": 0.0, "steps": 0}

        params = [p for _, p in trainable_parameters(model)]
        if not params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        runtime.place(model)
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(config.lr_scheduler, self.plan.warmup_steps, self.plan.total_steps))

    # -- set-up -------------------------------------------------------------------------------------

    def restore(self, candidates: Sequence[pathlib.Path]) -> Optional[int]:
        """Load the first usable of ``candidates`` (newest first; none: keep the fresh state); take the RNG
        snapshot the next step starts from. Unusable newer checkpoints are skipped with a warning; when
        none is usable the error of ``checkpoint/`` itself (else of the newest) is raised."""
        resumed = None
        errors: List[CheckpointError] = []
        for ckpt in candidates:
            try:
                state, rng = checkpoints.load_checkpoint(
                    ckpt, model=self.raw_model, optimizer=self.optimizer, scheduler=self.scheduler, rank=self.rt.rank,
                    total_steps=self.plan.total_steps, steps_per_epoch=self.plan.steps_per_epoch,
                    world_size=self.rt.world_size, record=self.record)
                checkpoints.restore_checkpoint_rng(ckpt, rng)
            except CheckpointError as exc:
                errors.append(exc)
                continue
            if errors:
                warnings.warn(f"resuming from {ckpt} (step {state.step}); skipped unusable newer checkpoint data: "
                              + "; ".join(str(e) for e in errors), RuntimeWarning)
            if state.world_size != self.rt.world_size:
                warnings.warn(f"resuming a run saved with {state.world_size} process(es) on {self.rt.world_size}: "
                              "the result will not be bit-identical", RuntimeWarning)
            state.total_steps, state.world_size = self.plan.total_steps, self.rt.world_size
            self.state = state
            self.checkpoint = ckpt
            resumed = state.step
            break
        else:
            if errors:
                main = [e for e in errors if e.path.parent == self.out / CHECKPOINT_DIR]
                first = (main or errors)[0]
                others = len(errors) - 1
                raise CheckpointError(f"{first}; cannot resume" + (f" (the {others} other checkpoint(s) found are unusable too)"
                                      if others else "") + "; pass overwrite to start the run over", first.path)
        self.rng = capture_rng()
        return resumed

    # -- running ------------------------------------------------------------------------------------

    def run(self) -> None:
        from tqdm.auto import tqdm

        cfg, st = self.config, self.state
        restore_gc = _enable_gradient_checkpointing(self.raw_model) if cfg.gradient_checkpointing else (lambda: None)
        was_training = self.raw_model.training
        self.model, self.optimizer = self.rt.prepare(self.raw_model, self.optimizer)
        self.model.train()
        bar = tqdm(total=self.plan.total_steps, initial=st.step, desc="train", unit="step",
                   disable=not (cfg.progress and self.rt.is_main), dynamic_ncols=True)
        try:
            with self.guard:
                while st.step < self.plan.total_steps:
                    groups = _epoch_groups(self.sampler, st.epoch, self.plan, self.rt.world_size)
                    for g in range(st.step_in_epoch, len(groups)):
                        self._step(groups[g], bar)
                        if st.step >= self.plan.total_steps:
                            break
                    if st.step_in_epoch >= len(groups):
                        st.epoch, st.step_in_epoch = st.epoch + 1, 0
        except KeyboardInterrupt:
            raise self._interrupted() from None
        finally:
            bar.close()
            restore_gc()
            self.raw_model.train(was_training)
            self.raw_model.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)  # set by the runtime for DDP
        if self.state.step and (self.checkpoint is None or checkpoints.checkpoint_step(self.out) != self.state.step):
            self._save()

    def _step(self, group: List[List[int]], bar: Any) -> None:
        cfg, st, rt = self.config, self.state, self.rt
        t0 = time.perf_counter()
        mine = group[rt.rank::rt.world_size]
        group_targets = int(self.targets[[i for b in group for i in b]].sum())
        scale = rt.world_size / max(1, group_targets)
        # CE sum, aux (token-weighted), tokens, Ctrl-C requests; float64 so long accumulations stay exact (MPS has none)
        sums = torch.zeros(4, dtype=torch.float32 if rt.device.type == "mps" else torch.float64, device=rt.device)
        # One process alone stops at the end of any micro-batch; several must stop at the same step, which
        # they agree on through sums[3] (one more reduction would cost a collective per step).
        alone = rt.world_size == 1
        for i, idx in enumerate(mine):
            batch = {k: v.to(rt.device, non_blocking=True) for k, v in self.collate([self.dataset[j] for j in idx]).items()}
            mb_targets = int(self.targets[idx].sum())
            with rt.no_sync(self.model, skip=i < len(mine) - 1):
                with rt.autocast():
                    out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                    ce = token_loss_sum(out.logits, batch["labels"])
                    loss = ce * scale
                    aux = out.get("aux_loss") if hasattr(out, "get") else None
                    if aux is not None:
                        # Token-weighted mean over the effective batch, like the LM loss.
                        loss = loss + aux * (mb_targets * scale)
                rt.backward(loss)
            sums[0] += ce.detach().to(sums.dtype)
            if aux is not None:
                sums[1] += aux.detach().to(sums.dtype) * mb_targets
            sums[2] += batch["attention_mask"].sum()
            if alone:
                self.guard.check()
        rt.sync_gradients(self.params)
        sums[3] = float(self.guard.requested)
        sums = rt.all_sum(sums)
        ce_sum, aux_sum, tokens, stops = (float(v) for v in sums.tolist())
        step_loss = ce_sum / max(1, group_targets)
        step_no = st.step + 1
        if not math.isfinite(step_loss) or not math.isfinite(aux_sum):
            self._non_finite(f"loss is {step_loss}" + ("" if math.isfinite(aux_sum) else f" (aux loss {aux_sum})"), step_no)
        norm = float(rt.clip_grad_norm(self.params, cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")))
        if not math.isfinite(norm):
            self._non_finite(f"gradient norm is {norm} (loss {step_loss:.6g})", step_no)
        lr = self.scheduler.get_last_lr()[0]

        self.consistent = False
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.step, st.step_in_epoch = step_no, st.step_in_epoch + 1
        st.tokens += int(tokens)
        st.loss, st.lr, st.grad_norm = step_loss, lr, norm
        self.consistent = True
        self.rng = capture_rng()

        seconds = time.perf_counter() - t0
        w = self._window
        w["loss"] += ce_sum
        w["aux"] += aux_sum
        w["targets"] += group_targets
        w["tokens"] += tokens
        w["seconds"] += seconds
        w["steps"] += 1
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / max(seconds, 1e-9):.0f}", refresh=False)
        bar.update(1)
        # The log line first: a kill between the two leaves it after the checkpoint's step, where resuming
        # cuts it off and the replayed step writes it again (the other order would lose it).
        if st.step % cfg.logging_steps == 0 or st.step == self.plan.total_steps:
            self._log_window()
        if st.step % cfg.save_steps == 0 or st.step == self.plan.total_steps:
            self._save()
        for cb in self.callbacks:
            cb(st, self.rt.unwrap(self.model))
        if alone:
            self.guard.check()
        elif stops:
            self.agreed_stop = True
            raise KeyboardInterrupt

    # -- bookkeeping --------------------------------------------------------------------------------

    def _save(self, gather: bool = True) -> None:
        rngs = self.rt.gather_object(self.rng) if gather else [self.rng]
        if self.rt.is_main:
            self.checkpoint = checkpoints.save_checkpoint(
                self.out, model=self.rt.unwrap(self.model) if hasattr(self, "model") else self.raw_model,
                optimizer=self.optimizer, scheduler=self.scheduler, state=self.state, rng=rngs, record=self.record)
        else:
            self.checkpoint = self.out / CHECKPOINT_DIR
        if gather:
            self.rt.wait()

    def _log(self, entry: Dict[str, Any]) -> None:
        if self.rt.is_main:
            append_log(self.out, entry)

    def _log_window(self) -> None:
        w, st = self._window, self.state
        entry = {"step": st.step, "epoch": round(st.step / self.plan.steps_per_epoch, 4),
                 "loss": w["loss"] / max(1, w["targets"]), "lr": st.lr, "grad_norm": st.grad_norm,
                 "tokens": st.tokens, "tokens_per_s": round(w["tokens"] / max(w["seconds"], 1e-9), 1)}
        if w["aux"]:
            entry["aux_loss"] = w["aux"] / max(1, w["targets"])
        self.history.append(entry)
        self._log(entry)
        self._window = {k: 0 if isinstance(v, int) else 0.0 for k, v in w.items()}

    def _interrupted(self) -> TrainingInterrupted:
        st = self.state
        if not self.consistent:
            msg = (f"interrupted during the optimizer update of step {st.step + 1}: no checkpoint written; "
                   f"the last one is {self.checkpoint} (step {checkpoints.checkpoint_step(self.out)})" if self.checkpoint else
                   f"interrupted during the optimizer update of step {st.step + 1}; no checkpoint was written")
            return TrainingInterrupted(msg, checkpoints.checkpoint_step(self.out), self.checkpoint)
        # Parameters, optimizer and scheduler are those of the last completed step, and self.rng was taken
        # right after it: a resumed run replays the interrupted step exactly. Every process's RNG is gathered
        # only when they all stopped here together (otherwise the others may be inside a collective).
        self._save(gather=self.agreed_stop)
        self._log({"event": "interrupted", "step": st.step})
        return TrainingInterrupted(f"interrupted after step {st.step}/{self.plan.total_steps}; checkpoint saved to "
                                   f"{self.checkpoint}", st.step, self.checkpoint)

    def _non_finite(self, what: str, step: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        where = (f"the last good checkpoint is {self.checkpoint} (step {checkpoints.checkpoint_step(self.out)})" if self.checkpoint
                 else "no checkpoint was written yet")
        self._log({"event": "non_finite", "step": step, "detail": what})
        raise NonFiniteLossError(
            f"training stopped at step {step} (epoch {self.state.epoch}): {what}; that step's update was not applied "
            f"and no final model was written; {where}. Lower the learning rate or check the data, then resume.",
            step, self.checkpoint)


def fit(model: nn.Module, tokenizer: Any, dataset: SFTDataset, output_dir: PathLike, config: TrainConfig, *,
        run_info: Mapping[str, Any], export: Callable[[nn.Module, pathlib.Path], None], resume: bool = False,
        overwrite: bool = False, callbacks: Sequence[Callback] = (), accelerate: Optional[bool] = None,
        device: Optional[Union[str, torch.device]] = None, fsdp: bool = False) -> TrainResult:
    """The training loop: AdamW on ``model``'s trainable parameters over ``dataset``, with checkpoints.

    Args:
        model: a causal LM (or :class:`~selfmoe.MiXSE`) whose parameters that require grad are trained;
            already seeded and built (its initial values are part of the run).
        tokenizer: pads the micro-batches.
        dataset: tokenized examples (:class:`~selfmoe.data.SFTDataset`).
        output_dir: the run directory (layout: :mod:`selfmoe.run_dir`).
        config: hyper-parameters; ``run_info``: JSON facts that identify the run besides the config
            (kind, data fingerprint, experts ...), compared on resume.
        export: ``export(model, directory)`` writes the final model into a new ``directory``; its files
            are then moved into ``output_dir``.
        resume / overwrite: continue the run in ``output_dir`` / replace it (see :mod:`selfmoe.run_dir`).
        callbacks: ``callback(state, model)`` after every optimizer step (after its checkpoint, if any).
        accelerate: ``None`` = use accelerate when launched by ``accelerate launch``/``torchrun``;
            ``True``/``False`` to force. ``device``: single-process device (default: CUDA if present).
        fsdp: shard the frozen base over the launched processes (:mod:`selfmoe.fsdp`); what trains stays
            whole, so checkpoints are those of any other run.

    Raises :class:`TrainingInterrupted`, :class:`NonFiniteLossError`, ``FileExistsError`` (run dir),
    :class:`CheckpointError` (no usable checkpoint to resume from), :class:`~selfmoe.io_utils.WriteError`
    (a write failed, e.g. a full disk), :class:`DistributedError` (several processes: another one died or
    hung; raised after the collective timeout at most).
    """
    config.validate()
    runtime = make_runtime(config.mixed_precision, accelerate, device, fsdp=fsdp)
    out = pathlib.Path(os.fspath(output_dir))
    record = run_record(config, run_info)
    if runtime.world_size == 1:
        return _fit(model, tokenizer, dataset, out, config, record, export, resume, overwrite, callbacks, runtime)
    try:
        return _fit(model, tokenizer, dataset, out, config, record, export, resume, overwrite, callbacks, runtime)
    except RuntimeError as exc:
        if isinstance(exc, DistributedError) or not collective_failure(exc):
            raise
        step = checkpoints.checkpoint_step(out)
        where = f"the last checkpoint is {out / CHECKPOINT_DIR} (step {step}); rerun with resume" if step >= 0 else \
            "no checkpoint was written"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedError(
            f"process {runtime.rank} of {runtime.world_size}: a collective operation failed ({first}). Another process "
            f"of this run died, hung or was stopped (collectives wait at most {collective_timeout():.0f} s, "
            f"{COLLECTIVE_TIMEOUT_ENV}); the launcher names the process that failed first; {where}",
            runtime.rank, runtime.world_size, out / CHECKPOINT_DIR if step >= 0 else None) from exc


def _fit(model: nn.Module, tokenizer: Any, dataset: SFTDataset, out: pathlib.Path, config: TrainConfig,
         record: Dict[str, Any], export: Callable[[nn.Module, pathlib.Path], None], resume: bool, overwrite: bool,
         callbacks: Sequence[Callback], runtime: SingleProcess) -> TrainResult:
    ckpts: List[pathlib.Path] = []
    if runtime.is_main and prepare_output_dir(out, record, resume=resume, overwrite=overwrite):
        ckpts = checkpoints.checkpoint_candidates(out)
    runtime.wait()
    if not runtime.is_main and resume:
        ckpts = checkpoints.checkpoint_candidates(out)
    loop = _Loop(model, tokenizer, dataset, out, config, record, runtime, callbacks)
    resumed = loop.restore(ckpts)
    if resume:
        runtime.wait()  # every process has read its checkpoint before it is moved
        if runtime.is_main:
            checkpoints.settle_checkpoints(out, loop.checkpoint)
        if loop.checkpoint is not None:
            loop.checkpoint = out / CHECKPOINT_DIR
    if resumed is not None:
        if runtime.is_main:
            truncate_log(out / LOG_NAME, resumed)
        loop._log({"event": "resume", "step": resumed, "total_steps": loop.plan.total_steps})
    else:
        if runtime.is_main:  # a run restarted from scratch (no checkpoint yet): its old lines are void
            (out / LOG_NAME).unlink(missing_ok=True)
        loop._log({"event": "start", "step": 0, "total_steps": loop.plan.total_steps, "examples": len(dataset),
                   "processes": runtime.world_size, "device": str(runtime.device), "precision": runtime.precision})
    loop.run()
    final = runtime.unwrap(loop.model)
    if runtime.is_main:
        publish(out, lambda path: export(final, path))
        loop._log({"event": "done", "step": loop.state.step, "tokens": loop.state.tokens})
    runtime.wait()
    return TrainResult(out, loop.state.step, loop.plan.total_steps, loop.state.loss, loop.history, resumed)


# ----------------------------------------------------------------------------------------------------
# The three uses


def _check_records(records: Sequence[Record]) -> List[Record]:
    recs = list(records)
    if not recs:
        raise ValueError("no training records")
    return recs


def _format_info(fmt: str) -> Dict[str, Any]:
    """What the run records about its prompt format: ``{"prompt_format": "chat"}``, nothing for Alpaca
    (the only format before the field existed, so those runs still resume)."""
    return {"prompt_format": fmt} if fmt != "alpaca" else {}


def train_expert(base_model: nn.Module, tokenizer: Any, records: Sequence[Record], output_dir: PathLike,
                 config: Optional[TrainConfig] = None, *, resume: bool = False, overwrite: bool = False,
                 callbacks: Sequence[Callback] = (), accelerate: Optional[bool] = None,
                 device: Optional[Union[str, torch.device]] = None, fsdp: bool = False, **overrides: Any) -> TrainResult:
    """Train one LoRA expert on ``records`` and save it to ``output_dir`` as a PEFT adapter.

    One domain's records give that domain's expert; the union of all domains gives the
    instance-merging baseline. ``base_model`` is wrapped during training and restored afterwards (also on
    errors); its weights are never changed. ``overrides``: :class:`TrainConfig` fields. See :func:`fit`
    for the other arguments.
    """
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    recs = _check_records(records)
    fmt = resolve_prompt_format(cfg.prompt_format, tokenizer)
    dataset = SFTDataset(recs, tokenizer, max_length=cfg.max_length, progress=cfg.progress, prompt_format=fmt)
    run_info = {"kind": "expert", "data": data_info(recs, dataset), "base": base_signature(base_model),
                "base_model": getattr(getattr(base_model, "config", None), "_name_or_path", None), **_format_info(fmt)}
    if cfg.experts == "rank1":
        run_info["kind"] = "rank1"
        return _train_rank1(base_model, tokenizer, dataset, output_dir, cfg, run_info, recs, resume=resume,
                            overwrite=overwrite, callbacks=callbacks, accelerate=accelerate, device=device, fsdp=fsdp)
    set_seed(cfg.seed)  # the LoRA init is part of the run
    add_lora(base_model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules)
    base_name = getattr(getattr(base_model, "config", None), "_name_or_path", None) or None

    def export(model: nn.Module, path: pathlib.Path) -> None:
        save_lora_adapter(path, lora_weights(model), r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          base_model_name_or_path=base_name, extra_config={"lora_dropout": cfg.lora_dropout})

    try:
        return fit(base_model, tokenizer, dataset, output_dir, cfg, run_info=run_info, export=export, resume=resume,
                   overwrite=overwrite, callbacks=callbacks, accelerate=accelerate, device=device, fsdp=fsdp)
    finally:
        remove_lora(base_model)


def _fit_batches(dataset: SFTDataset, tokenizer: Any, size: int = 16) -> List[Dict[str, torch.Tensor]]:
    """The training examples as padded batches (in dataset order) for fitting the intuition prior."""
    collate = SFTCollator.for_tokenizer(tokenizer)
    return [collate([dataset[j] for j in range(i, min(i + size, len(dataset)))]) for i in range(0, len(dataset), size)]


def _train_rank1(base_model: nn.Module, tokenizer: Any, dataset: SFTDataset, output_dir: PathLike, cfg: TrainConfig,
                 run_info: Dict[str, Any], recs: Sequence[Record], **fit_kwargs: Any) -> TrainResult:
    """:func:`train_expert` with ``experts="rank1"``: a MoR1E adapter (:meth:`MiXSE.from_rank1`), saved as a
    MiXSE directory. With ``intuition``, its prior's centroids are fitted (k-means) on the training
    examples first (deterministic, so a resumed run fits the same ones)."""
    from .intuition import IntuitionConfig
    from .targets import hidden_size_of

    if cfg.lora_dropout > 0:
        raise ValueError("TrainConfig.lora_dropout: rank-1 experts have no dropout; set it to 0")
    set_seed(cfg.seed)  # the experts' and routers' init is part of the run
    intuition = None
    if cfg.intuition:
        intuition = IntuitionConfig(clusters=min(cfg.intuition_clusters, len(dataset)), dim=hidden_size_of(base_model),
                                    layer=cfg.intuition_layer, learned_map=True)
    model = MiXSE.from_rank1(base_model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, top_k=cfg.expert_top_k,
                             target_modules=cfg.target_modules, mix_and_match=cfg.mix_and_match, intuition=intuition,
                             aux_loss=dict(cfg.aux_loss))
    try:
        if intuition is not None:
            model.fit_intuition(_fit_batches(dataset, tokenizer), seed=cfg.seed)

        def export(m: nn.Module, path: pathlib.Path) -> None:
            m.save_pretrained(path)

        return fit(model, tokenizer, dataset, output_dir, cfg, run_info=run_info, export=export, **fit_kwargs)
    finally:
        model.unload()


def _router_intuition(model_base: nn.Module, experts: Mapping[str, PathLike], recs: Sequence[Record],
                      cfg: TrainConfig) -> Any:
    """``(IntuitionConfig, labels or None)`` for ``router="intuition"``: when every record's domain names
    an expert, the clusters are the experts' domains (centroid = the domain's mean embedding, prior =
    cluster softmax, no map to learn); otherwise k-means clusters with a learned cluster-to-expert map."""
    from .intuition import IntuitionConfig
    from .targets import hidden_size_of

    names = list(experts)
    domains = [r.get("domain") for r in recs]
    d = hidden_size_of(model_base)
    if all(dom in names for dom in domains):
        return (IntuitionConfig(clusters=len(names), dim=d, layer=cfg.intuition_layer, learned_map=False),
                [names.index(dom) for dom in domains])
    return IntuitionConfig(clusters=min(cfg.intuition_clusters, len(recs)), dim=d, layer=cfg.intuition_layer), None


def train_router(base_model: nn.Module, tokenizer: Any, experts: Mapping[str, PathLike], records: Sequence[Record],
                 output_dir: PathLike, config: Optional[TrainConfig] = None, *, resume: bool = False,
                 overwrite: bool = False, callbacks: Sequence[Callback] = (), accelerate: Optional[bool] = None,
                 device: Optional[Union[str, torch.device]] = None, fsdp: bool = False,
                 **overrides: Any) -> TrainResult:
    """Train the MiXSE router over frozen ``experts`` (``{name: PEFT adapter dir}``) and save the MiXSE
    (:meth:`MiXSE.save_pretrained` format) to ``output_dir``.

    Base and expert weights stay bit-identical; only the router (and the HyperExpert, with
    ``hyper_expert``) learns, on the plain LM loss (plus ``output.aux_loss`` when ``aux_loss`` is
    configured). ``base_model`` is restored afterwards (with ``fsdp=True`` it is left sharded: see
    :mod:`selfmoe.fsdp`).
    """
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    if not isinstance(experts, Mapping) or not experts:
        raise ValueError("experts must be a non-empty {name: adapter directory} mapping")
    check_top_k(cfg.top_k, len(experts))
    recs = _check_records(records)
    expert_info = {}
    for name, path in experts.items():
        weights = pathlib.Path(os.fspath(path)) / ADAPTER_WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"expert {name!r}: {weights} not found (is {os.fspath(path)} a PEFT adapter directory?)")
        expert_info[name] = file_sha256(weights)
    fmt = resolve_prompt_format(cfg.prompt_format, tokenizer)
    dataset = SFTDataset(recs, tokenizer, max_length=cfg.max_length, progress=cfg.progress, prompt_format=fmt)
    run_info = {"kind": "router", "data": data_info(recs, dataset), "experts": expert_info,
                "base": base_signature(base_model),
                "base_model": getattr(getattr(base_model, "config", None), "_name_or_path", None), **_format_info(fmt)}
    set_seed(cfg.seed)  # the router init is part of the run
    intuition, labels = _router_intuition(base_model, experts, recs, cfg) if cfg.router == "intuition" else (None, None)
    model = MiXSE.from_adapters(base_model, dict(experts), top_k=cfg.top_k,
                                router="shared" if cfg.router == "intuition" else cfg.router,
                                aux_loss=dict(cfg.aux_loss), intuition=intuition, hyper_expert=cfg.hyper_expert)
    try:
        if intuition is not None:  # centroids from the training data, before the first step
            batches = _fit_batches(dataset, tokenizer)
            if labels is not None:  # one domain at a time, so each example keeps its label
                batches, labels = [], []
                for e, name in enumerate(experts):
                    part = SFTDataset([r for r in recs if r.get("domain") == name], tokenizer, max_length=cfg.max_length,
                                      prompt_format=fmt)
                    batches += _fit_batches(part, tokenizer)
                    labels += [e] * len(part)
            model.fit_intuition(batches, labels=labels, seed=cfg.seed)
        router_ids = {id(p) for p in model.router_parameters()}
        leaked = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in router_ids]
        if leaked:  # MiXSE.from_adapters freezes base and experts; training them here would be a silent bug
            raise RuntimeError(f"router training: non-router parameters require grad: {leaked[:3]}")

        def export(m: nn.Module, path: pathlib.Path) -> None:
            m.save_pretrained(path)

        return fit(model, tokenizer, dataset, output_dir, cfg, run_info=run_info, export=export, resume=resume,
                   overwrite=overwrite, callbacks=callbacks, accelerate=accelerate, device=device, fsdp=fsdp)
    finally:
        model.unload()
