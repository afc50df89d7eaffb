"""The named options users pick from, defined once: router kinds, merge methods, eval task kinds ...

Torch-free on purpose (constants only): the command line offers these as ``choices=`` and
lists them in ``--help`` without loading the library, and the library module that owns each choice
imports it from here, so the two cannot drift apart.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Tuple

__all__ = [
    "ROUTER_KINDS",
    "ROUTER_CHOICES",
    "EXPERT_KINDS",
    "ROUTING_MODES",
    "AUX_LOSS_NAMES",
    "MERGE_METHODS",
    "EVAL_TASKS",
    "LR_SCHEDULERS",
    "MIXED_PRECISIONS",
    "GENERATION_BACKENDS",
    "DTYPES",
    "MC_SCORING",
    "COMPARE_BY",
    "PROMPT_FORMATS",
    "HYPER_DEFAULTS",
    "check_aux_loss",
    "check_hyper_sizes",
]

#: Where a MiXSE's router sits (:mod:`selfmoe.routers`, :mod:`selfmoe.placements`).
ROUTER_KINDS: Tuple[str, ...] = ("shared", "xlora", "per_layer")
#: What router training offers: the kinds above, and ``intuition`` = the shared router with an
#: instance-level intuition prior mixed in (Liu et al. 2024; :mod:`selfmoe.intuition`).
ROUTER_CHOICES: Tuple[str, ...] = ROUTER_KINDS + ("intuition",)
#: What ``train-expert`` trains: one plain LoRA (``lora``), or a mixture of rank-1 experts (``rank1``,
#: MoR1E: a rank-r LoRA whose r components are experts behind per-layer token routers; :mod:`selfmoe.rank1`).
EXPERT_KINDS: Tuple[str, ...] = ("lora", "rank1")
#: How a router picks experts: its learned logits, or N(0, 1) logits (the random-routing ablation).
ROUTING_MODES: Tuple[str, ...] = ("learned", "random")
#: Optional router losses, the keys of :data:`selfmoe.routers.AUX_LOSSES`.
AUX_LOSS_NAMES: Tuple[str, ...] = ("load_balancing", "z_loss", "mutual_information", "concentration")
#: Weight-merging baselines (:mod:`selfmoe.merging`).
MERGE_METHODS: Tuple[str, ...] = ("linear", "ties", "dare", "dare_ties")
#: Evaluation record kinds, the ``"task"`` of an eval record (:mod:`selfmoe.evaluation`).
EVAL_TASKS: Tuple[str, ...] = ("multiple_choice", "exact_match", "numeric", "code")
#: Learning-rate decay after warm-up (``TrainConfig.lr_scheduler``).
LR_SCHEDULERS: Tuple[str, ...] = ("cosine", "linear", "constant")
#: ``TrainConfig.mixed_precision``: auto (bf16 autocast on a GPU that has it), no, bf16.
MIXED_PRECISIONS: Tuple[str, ...] = ("auto", "no", "bf16")
#: Text generation backends (:func:`selfmoe.generate.make_generator`).
GENERATION_BACKENDS: Tuple[str, ...] = ("hf", "vllm", "auto")
#: Weights dtypes a model can be loaded in; ``auto`` keeps the checkpoint's.
DTYPES: Tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
#: How ``selfmoe eval`` scores multiple choice: generate an answer and read its letter, or compare the
#: log-likelihood of each option letter (:mod:`selfmoe.eval_scoring`).
MC_SCORING: Tuple[str, ...] = ("generate", "loglik")
#: The columns of ``selfmoe compare``: task kinds, source files or record domains (:mod:`selfmoe.compare`).
COMPARE_BY: Tuple[str, ...] = ("task", "source", "domain")
#: How an instruction becomes a prompt (:mod:`selfmoe.prompt_format`): ``auto`` = ``chat`` when the
#: tokenizer has a chat template, else ``alpaca``; ``chat`` = the tokenizer's chat template;
#: ``alpaca`` = the Alpaca template the paper trains with.
PROMPT_FORMATS: Tuple[str, ...] = ("auto", "chat", "alpaca")
#: HyperMoE's HyperExpert sizes (:mod:`selfmoe.hyper`): expert embeddings, MLP width, layer embeddings,
#: the hypernetwork's bottleneck, the generated adapter's width.
HYPER_DEFAULTS: Dict[str, int] = {"embedding_dim": 128, "mlp_dim": 128, "layer_dim": 10, "bottleneck": 128,
                                  "adapter_dim": 64}


def check_aux_loss(aux_loss: Any) -> Dict[str, float]:
    """Validate ``{loss name: coefficient}`` (names from :data:`AUX_LOSS_NAMES`, finite coefficients
    >= 0); returns a clean dict with zero coefficients dropped. ``TypeError``/``ValueError`` naming the entry."""
    if aux_loss is None:
        return {}
    names = sorted(AUX_LOSS_NAMES)
    if not isinstance(aux_loss, dict):
        raise TypeError(f"aux_loss must be a dict {{name: coefficient}} with names in {names}, got {type(aux_loss).__name__}")
    out: Dict[str, float] = {}
    for name, coef in aux_loss.items():
        if name not in AUX_LOSS_NAMES:
            raise ValueError(f"aux_loss: unknown loss {name!r}; known: {names}")
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef) or coef < 0:
            raise ValueError(f"aux_loss[{name!r}] must be a finite float >= 0, got {coef!r}")
        if coef > 0:
            out[name] = float(coef)
    return out


def check_hyper_sizes(sizes: Any, where: str = "hyper_expert") -> Any:
    """The HyperExpert option: ``None``/``False`` -> None (off); ``True`` -> :data:`HYPER_DEFAULTS`; a dict ->
    the defaults updated with it (known keys, ints >= 1). ``ValueError`` naming the key otherwise."""
    if sizes is None or sizes is False:
        return None
    if sizes is True:
        return dict(HYPER_DEFAULTS)
    if not isinstance(sizes, dict):
        raise ValueError(f"{where} must be True, None or a dict of sizes {sorted(HYPER_DEFAULTS)}, got {sizes!r}")
    unknown = sorted(set(sizes) - set(HYPER_DEFAULTS))
    if unknown:
        raise ValueError(f"{where}: unknown sizes {unknown}; known: {sorted(HYPER_DEFAULTS)}")
    out = dict(HYPER_DEFAULTS)
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}[{key!r}] must be an int >= 1, got {value!r}")
        out[key] = value
    return out
