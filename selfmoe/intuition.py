"""Intuition routing (Liu et al. 2024, "Intuition-aware Mixture-of-Rank-1-Experts"): an instance-level
routing prior mixed into the token router.

Each sequence is embedded once (by default the base model's own hidden state at a chosen layer,
mean-pooled over the attention mask; or any ``encoder(input_ids, attention_mask) -> [B, D]`` the user
passes). Its cosine scores to ``C`` centroids fitted on the training data (k-means, or one centroid per
domain) give cluster probabilities ``softmax(cos / temperature)`` ``[B, C]``; a cluster-to-expert map
turns them into a prior over the ``E`` experts ``[B, E]`` (the identity when the clusters are the experts'
own domains, else a learned ``[C, E]`` softmax map). Each router then mixes it with its token gates::

    R = softmax(W x) * w + prior * (1 - w),   w = sigmoid(prior_logit)  (one learned scalar per router)

and keeps the top-k of ``R`` (see :meth:`selfmoe.routers.TopKRouter.forward`). The prior is computed
before the decoder runs and kept per KV cache, so generation uses the prompt's prior for every new
token (:class:`selfmoe.model.MiXSE` does the bookkeeping).

On disk (a MiXSE directory): ``intuition.safetensors`` holds ``centroids [C, D]`` and, with a learned
map, ``cluster_map [C, E]``; ``mixse_config.json`` holds :class:`IntuitionConfig` as ``intuition``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IntuitionConfig", "IntuitionPrior", "kmeans", "masked_mean", "mix_with_prior", "INTUITION_NAME"]

INTUITION_NAME = "intuition.safetensors"


@dataclass
class IntuitionConfig:
    """How the prior is built (saved as ``mixse_config.json["intuition"]``).

    ``clusters``: C centroids; ``dim``: their width D (the hidden size, or the encoder's output);
    ``layer``: which hidden state is pooled, 0 = the token embeddings (free: no extra pass), i = the
    output of decoder layer i (an expert-free pass over the first i layers, no grad); ``temperature``
    of the cluster softmax; ``learned_map``: a learned ``[C, E]`` cluster-to-expert map (False: the
    clusters are the experts, C = E); ``encoder``: "hidden" (the base model) or "external" (a callable
    passed by the user, again at load time).
    """

    clusters: int
    dim: int
    layer: int = 0
    temperature: float = 0.1
    learned_map: bool = True
    encoder: str = "hidden"

    def validate(self, num_experts: Optional[int] = None) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.clusters) or self.clusters < 1:
            raise ValueError(f"intuition.clusters must be an int >= 1, got {self.clusters!r}")
        if not is_int(self.dim) or self.dim < 1:
            raise ValueError(f"intuition.dim must be an int >= 1, got {self.dim!r}")
        if not is_int(self.layer) or self.layer < 0:
            raise ValueError(f"intuition.layer must be an int >= 0 (0 = token embeddings), got {self.layer!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"intuition.temperature must be a finite number > 0, got {t!r}")
        if not isinstance(self.learned_map, bool):
            raise ValueError(f"intuition.learned_map must be true or false, got {self.learned_map!r}")
        if self.encoder not in ("hidden", "external"):
            raise ValueError(f"intuition.encoder must be 'hidden' or 'external', got {self.encoder!r}")
        if num_experts is not None and not self.learned_map and self.clusters != num_experts:
            raise ValueError(f"intuition: without a learned map the clusters are the experts, so clusters must equal "
                             f"the number of experts ({num_experts}), got {self.clusters}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "intuition") -> "IntuitionConfig":
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}")
        missing = [k for k in ("clusters", "dim") if k not in d]
        if missing:
            raise ValueError(f"{where}: missing fields {missing}")
        return cls(**dict(d))


def masked_mean(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, S, D] -> [B, D]``: the mean over the positions the mask keeps (all when ``None``), in float32."""
    h = hidden.float()
    if attention_mask is None:
        return h.mean(1)
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask {list(attention_mask.shape)} does not match hidden states {list(hidden.shape)}")
    m = attention_mask.to(device=h.device, dtype=h.dtype).unsqueeze(-1)  # [B, S, 1]
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def kmeans(points: torch.Tensor, k: int, *, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Spherical k-means (cosine) of ``points [N, D]`` into ``k`` unit centroids ``[k, D]`` (float32).

    Deterministic for a given ``seed``: k-means++ seeding from a seeded generator, then Lloyd steps on
    unit vectors (assign to the highest cosine, centroid = normalised mean) until no assignment
    changes. An emptied cluster takes the point farthest from its centroid. ``k > N`` raises.
    """
    if points.dim() != 2 or points.shape[0] < 1:
        raise ValueError(f"points must be [N, D] with N >= 1, got {list(points.shape)}")
    N = points.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"k must be an int in [1, N={N}] (one point per cluster at least), got {k!r}")
    x = F.normalize(points.detach().float(), dim=-1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    # k-means++ on cosine distance: each next seed drawn with probability ~ its distance to the nearest seed
    first = int(torch.randint(N, (1,), generator=g))
    chosen = [first]
    dist = (1 - x @ x[first]).clamp_min(0)
    for _ in range(1, k):
        p = dist.cpu().double()
        nxt = int(torch.multinomial(p / p.sum(), 1, generator=g)) if p.sum() > 0 else int(torch.randint(N, (1,), generator=g))
        chosen.append(nxt)
        dist = torch.minimum(dist, (1 - x @ x[nxt]).clamp_min(0))
    centroids = x[chosen].clone()
    assign = None
    for _ in range(iters):
        sims = x @ centroids.t()  # [N, k]
        new = sims.argmax(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:  # refill an empty cluster with the worst-served point (one each, deterministic)
            worst = sims.gather(1, assign[:, None]).squeeze(1).argsort()[: len(empty)]
            for c, i in zip(empty, worst.tolist()):
                sums[c] = x[i]
        centroids = F.normalize(sums, dim=-1)
    return centroids


def mix_with_prior(probs: torch.Tensor, prior: torch.Tensor, prior_logit: torch.Tensor) -> torch.Tensor:
    """``probs * w + prior * (1 - w)`` with ``w = sigmoid(prior_logit)``.

    ``probs [..., E]`` token gates; ``prior [B, E]`` one row per sequence, broadcast over the tokens:
    ``probs`` is ``[B, S, E]`` or any flattening of it with the batch outermost (``[B*S, E]``).
    """
    E = probs.shape[-1]
    if prior.dim() != 2 or prior.shape[1] != E:
        raise ValueError(f"prior must be [B, {E}], got {list(prior.shape)}")
    B = prior.shape[0]
    lead = probs.shape[:-1]
    n = lead.numel()
    if len(lead) >= 2 and lead[0] == B:
        p = prior.reshape(B, *([1] * (len(lead) - 1)), E)
    elif n % B == 0:  # flattened tokens: batch outermost
        p = prior.repeat_interleave(n // B, dim=0).reshape(*lead, E)
    else:
        raise ValueError(f"router input with leading dims {list(lead)} does not split into the prior's {B} sequences")
    w = torch.sigmoid(prior_logit.float())
    return probs * w + p.to(probs.dtype) * (1 - w)


class IntuitionPrior(nn.Module):
    """Centroids and the cluster-to-expert map; ``forward(embeddings [B, D]) -> prior [B, E]``.

    Buffers: ``centroids [C, D]`` (unit rows, fitted with :func:`kmeans` or per-domain means). Parameter
    (``learned_map`` only): ``cluster_map [C, E]``, row-softmaxed; zero at the start, so the prior is
    uniform until training moves it.
    """

    def __init__(self, config: IntuitionConfig, num_experts: int, device: Optional[torch.device] = None) -> None:
        super().__init__()
        config.validate(num_experts)
        self.config = config
        self.num_experts = num_experts
        self.register_buffer("centroids", torch.zeros(config.clusters, config.dim, device=device))
        self.cluster_map = (nn.Parameter(torch.zeros(config.clusters, num_experts, device=device))
                            if config.learned_map else None)
        self.fitted = False

    def extra_repr(self) -> str:
        c = self.config
        return (f"clusters={c.clusters}, dim={c.dim}, layer={c.layer}, temperature={c.temperature}, "
                f"learned_map={c.learned_map}, encoder={c.encoder!r}")

    @torch.no_grad()
    def set_centroids(self, centroids: torch.Tensor) -> None:
        """Install ``[C, D]`` centroids (normalised here)."""
        if tuple(centroids.shape) != tuple(self.centroids.shape):
            raise ValueError(f"centroids must be {list(self.centroids.shape)}, got {list(centroids.shape)}")
        if not torch.isfinite(centroids).all():
            raise ValueError("centroids hold NaN or inf")
        self.centroids.copy_(F.normalize(centroids.float(), dim=-1))
        self.fitted = True

    def cluster_probs(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[B, D] -> [B, C]``: softmax over the cosine scores to the centroids / temperature."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.config.dim:
            raise ValueError(f"sequence embeddings must be [B, {self.config.dim}], got {list(embeddings.shape)}")
        c = self.centroids
        cos = F.normalize(embeddings.to(device=c.device, dtype=torch.float32), dim=-1) @ c.t()
        return torch.softmax(cos / self.config.temperature, dim=-1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError("the intuition prior has no centroids yet: fit them first (MiXSE.fit_intuition)")
        probs = self.cluster_probs(embeddings)  # [B, C]
        if self.cluster_map is None:
            return probs  # the clusters are the experts
        return probs @ torch.softmax(self.cluster_map, dim=-1)  # [B, E]

    def tensors(self) -> Dict[str, torch.Tensor]:
        """What ``intuition.safetensors`` holds."""
        out = {"centroids": self.centroids}
        if self.cluster_map is not None:
            out["cluster_map"] = self.cluster_map
        return out

    @torch.no_grad()
    def load_tensors(self, tensors: Mapping[str, torch.Tensor], where: str) -> None:
        """Copy tensors written by :meth:`tensors` back, checked for names and shapes (``ValueError`` naming ``where``)."""
        own = self.tensors()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(f"{where}: expected tensors {sorted(own)}, missing {missing}, unexpected {unexpected}")
        for name, t in own.items():
            if tuple(tensors[name].shape) != tuple(t.shape):
                raise ValueError(f"{where}: {name} has shape {list(tensors[name].shape)}, expected {list(t.shape)}")
        self.set_centroids(tensors["centroids"])
        if self.cluster_map is not None:
            self.cluster_map.copy_(tensors["cluster_map"])
