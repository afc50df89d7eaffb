"""Training with the frozen base sharded across processes (PyTorch FSDP2, ``fully_shard``): :class:`FSDPRuntime`.

For a base too big to replicate on every device. ``fit(..., fsdp=True)`` / ``selfmoe train-router --fsdp``
under ``torchrun`` (or ``accelerate launch``) shards each decoder layer and then the rest of the model over all
processes; every process holds 1/N of the base and gathers one layer at a time in forward and backward.

What trains is *not* sharded (``fully_shard(..., ignored_params=...)``): the router, the LoRA factors being
trained, and a MiXSE's frozen experts (small next to the base; the final export reads them) stay whole on every
process as ordinary tensors. Hence the optimizer, the checkpoints (trainable tensors only, the same files as a
one-process or DDP run, so a run resumes across these modes) and the final ``save_pretrained`` work unchanged;
their gradients are averaged over the processes by one all-reduce per optimizer step
(:meth:`FSDPRuntime.sync_gradients`), after the step's last micro-batch.

The model stays sharded after training (FSDP2 cannot undo ``fully_shard``): the command line exits, a caller
in Python should not reuse the base model object in that process. FSDP1 is not used: on CPUs (gloo) it crashed
gathering a full state dict.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, List, Optional, Sequence, Set, Union

import torch
from torch import nn

from .train_runtime import SingleProcess, _resolve_precision, collective_timeout, launched_distributed

__all__ = ["FSDPRuntime", "unsharded_parameters"]


def unsharded_parameters(model: nn.Module) -> Set[nn.Parameter]:
    """The parameters FSDP leaves whole: every one that trains, and a MiXSE's expert stacks."""
    from .model import MiXSE

    keep = {p for p in model.parameters() if p.requires_grad}
    if isinstance(model, MiXSE):
        for layer in model.lora_modules.values():
            keep.update((layer.lora_A, layer.lora_B))
    return keep


class FSDPRuntime(SingleProcess):
    """Several processes (``torchrun``/``accelerate launch``), the frozen base sharded by FSDP2, the trainable
    tensors replicated and all-reduced once per step. Autocast as :class:`SingleProcess`."""

    def __init__(self, device: Optional[Union[str, torch.device]], precision: str) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if not launched_distributed():
            raise ValueError("fsdp=True shards the base over several processes: launch with "
                             "`torchrun --nproc_per_node N -m selfmoe ...` or `accelerate launch --multi_gpu ...`")
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda":
            if dev.index is None:
                dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        self.timeout = collective_timeout()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=self.timeout))
        self.device = dev
        self.precision = _resolve_precision(precision, dev)
        if self.precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision {self.precision!r} is not supported (use 'no' or 'bf16')")
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        self.mesh = init_device_mesh(dev.type, (self.world_size,))
        self._dist = dist

    def place(self, model: nn.Module) -> None:
        """Shard ``model`` (each decoder layer, then the root) onto this process's device; what
        :func:`unsharded_parameters` names is moved there whole."""
        from torch.distributed.fsdp import fully_shard

        from .model import MiXSE
        from .targets import find_decoder_layers

        keep = unsharded_parameters(model)
        inner = model.base_model if isinstance(model, MiXSE) else model
        _, layers = find_decoder_layers(inner)
        for layer in layers:
            fully_shard(layer, mesh=self.mesh, ignored_params=keep)
        fully_shard(model, mesh=self.mesh, ignored_params=keep)
        with torch.no_grad():
            for p in keep:  # same Parameter objects (the optimizer holds them), data on the device
                p.data = p.data.to(self.device)

    def sync_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Average the step's gradients of ``params`` over the processes: one all-reduce of one flat buffer."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(t)
        return t

    def gather_object(self, obj: Any) -> List[Any]:
        out: List[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj)
        return out

    def wait(self) -> None:
        self._dist.barrier()

    def no_sync(self, model: nn.Module, skip: bool):
        return contextlib.nullcontext()  # nothing FSDP manages has a gradient; sync_gradients runs once per step
