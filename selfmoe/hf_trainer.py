"""Training a MiXSE with the Hugging Face ``transformers.Trainer``: :class:`MiXSETrainer`.

``selfmoe train-router`` (:func:`selfmoe.train.train_router`) is the library's own loop; this is for users whose
pipelines are built around ``Trainer`` (callbacks, loggers, their data collators)::

    model = MiXSE.from_adapters(base, {"math": "experts/math", "code": "experts/code"},
                                aux_loss={"load_balancing": 0.01})
    trainer = MiXSETrainer(model=model, args=TrainingArguments("out", learning_rate=1e-3, ...),
                           train_dataset=dataset, data_collator=collator)
    trainer.train()                       # only the router learns; base and experts stay frozen
    trainer.save_model("mixse")           # MiXSE.save_pretrained format: MiXSE.from_pretrained("mixse", base)

What it changes in ``Trainer``:

- the loss is the LM loss plus ``output.aux_loss`` (the configured router losses), the auxiliary part
  token-weighted over the accumulated batch exactly like the LM loss when ``Trainer`` normalises by the
  number of target tokens (``num_items_in_batch``), so gradient accumulation and several processes do not
  change it;
- the optimizer holds only the parameters that require grad (``Trainer`` already skips frozen ones): the
  router, or router and experts for :meth:`MiXSE.from_scratch`;
- checkpoints and :meth:`~transformers.Trainer.save_model` write :meth:`MiXSE.save_pretrained`'s files
  (``mixse_config.json``, ``experts.safetensors``, ``router.safetensors``; never the base model), moved into
  the directory file by file so that ``checkpoint-*`` folders already there stay;
  ``resume_from_checkpoint`` and ``load_best_model_at_end`` load them back into the live model;
- the columns a dataset may keep are those of the wrapped model's ``forward`` (MiXSE's own takes
  ``*args, **kwargs``), and ``labels`` is the label column.
"""
from __future__ import annotations

import inspect
import os
import pathlib
from typing import Any, Dict, Mapping, Optional, Union

import torch
from torch import nn
from transformers import Trainer

from .mixse_config import CONFIG_NAME, EXPERTS_NAME, ROUTER_NAME
from .model import MiXSE

__all__ = ["MiXSETrainer", "load_mixse_weights"]


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, accelerate wrappers
        model = model.module
    return model


def load_mixse_weights(model: MiXSE, directory: Union[str, os.PathLike]) -> None:
    """Load the router (and, when the experts train, the experts) that :meth:`MiXSE.save_pretrained` wrote
    to ``directory`` into the live ``model`` in place: what a resumed ``Trainer`` run needs. The expert
    names must be the model's; errors name the file and the tensor."""
    import json

    from safetensors.torch import load_file

    root = pathlib.Path(os.fspath(directory))
    cfg_path, router_path = root / CONFIG_NAME, root / ROUTER_NAME
    if not cfg_path.is_file() or not router_path.is_file():
        raise FileNotFoundError(f"{root}: no MiXSE checkpoint here ({CONFIG_NAME} and {ROUTER_NAME} expected)")
    saved = json.loads(cfg_path.read_text(encoding="utf-8"))
    if saved.get("expert_names") != model.expert_names:
        raise ValueError(f"{cfg_path}: experts {saved.get('expert_names')}, the model has {model.expert_names}")
    model.load_router_state_dict(load_file(str(router_path)), where=str(router_path))
    if model.mixse_config.trainable_experts:
        experts_path = root / EXPERTS_NAME
        tensors = load_file(str(experts_path))
        with torch.no_grad():
            for path, layer in model.lora_modules.items():
                for name in ("lora_A", "lora_B"):
                    key = f"{path}.{name}"
                    t = tensors.get(key)
                    if t is None or tuple(t.shape) != tuple(getattr(layer, name).shape):
                        raise ValueError(f"{experts_path}: {key} is missing or has another shape than the model's "
                                         f"{list(getattr(layer, name).shape)}")
                    getattr(layer, name).copy_(t)


class MiXSETrainer(Trainer):
    """``transformers.Trainer`` for a :class:`~selfmoe.MiXSE` (see the module docstring for what differs)."""

    def __init__(self, model: Optional[MiXSE] = None, *args: Any, **kwargs: Any) -> None:
        if not isinstance(_unwrap(model) if model is not None else None, MiXSE):
            raise TypeError(f"MiXSETrainer trains a MiXSE, got model={type(model).__name__}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("MiXSETrainer: the MiXSE has no trainable parameters (its router is frozen?)")
        super().__init__(model, *args, **kwargs)
        if self.args.label_names is None:
            self.label_names = ["labels"]  # found by inspecting forward, which MiXSE's *args/**kwargs hides
        self.can_return_loss = True

    @property
    def mixse(self) -> MiXSE:
        return _unwrap(self.model)

    # -- data ---------------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            params = inspect.signature(self.mixse.base_model.forward).parameters
            self._signature_columns = list(dict.fromkeys(list(params) + ["label", "label_ids"] + list(self.label_names)))

    # -- loss ---------------------------------------------------------------------------------------

    def compute_loss(self, model: nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Union[torch.Tensor, int]] = None) -> Any:
        labels = inputs.get("labels")
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux = outputs.get("aux_loss") if isinstance(outputs, Mapping) else None
        if aux is not None and model.training:
            if num_items_in_batch is not None and labels is not None and self.model_accepts_loss_kwargs:
                # The LM loss of this micro-batch is its token sum / the accumulated batch's tokens (and is
                # multiplied back by the process count when tokens are averaged across processes): weight the
                # router loss by this micro-batch's share of the tokens in the same way.
                items = labels[..., 1:].ne(-100).sum().to(aux.dtype)
                aux = aux * items / torch.as_tensor(num_items_in_batch, dtype=aux.dtype, device=aux.device)
                if self.args.average_tokens_across_devices:
                    aux = aux * (self.accelerator.num_processes // self.get_tp_size())
            loss = loss + aux.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    # -- saving and loading -------------------------------------------------------------------------

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        from .run_dir import publish

        if not self.args.should_save:
            return
        out = pathlib.Path(output_dir if output_dir is not None else self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # MiXSE.save_pretrained replaces a whole directory; Trainer's output_dir holds checkpoint-* folders.
        publish(out, lambda path: self.mixse.save_pretrained(path))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(out))
        from transformers.trainer import TRAINING_ARGS_NAME

        torch.save(self.args, out / TRAINING_ARGS_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        load_mixse_weights(_unwrap(model) if model is not None else self.mixse, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_mixse_weights(self.mixse, self.state.best_model_checkpoint)
