"""DIKI: distribution-aware interference-free knowledge integration (Tang et al., ECCV 2024; lloongx/DIKI,
`DIKI/DIKI.py`, `clip/attention.py`, `configs/MTIL.yaml`; BASELINES.md section 5).

CLIP stays frozen. Each task t owns prefix keys and values for the first `depth` blocks of both encoders,
attended in the *residual* mode (models/attention.py): a softmax of the queries over the prefix keys alone,
times the prefix values, added to the block's attention output before its out-projection:

    attn(x) + w * softmax(q K_t^T / sqrt(d)) V_t,      K_t ~ U(-1, 1),  V_t = 0 at the start

so an untrained prompt (V_t = 0) or an unselected one (w = 0) leaves CLIP exactly as it was.

    begin task t    mean and covariance of the frozen image features (unit length) of the task's training
                    images: one Gaussian per task
    training        the task's own prompt in every image and text forward, w = 1; cross-entropy over the
                    task's classes
    test            log p_k(f) under every learned task's Gaussian; the best k gives the prompt and
                    w = sigmoid(log p_k(f) / 512 - 1) per image; the batch uses its most frequent k (the official
                    `batchwise_prompt: True`) and the text side the batch's mean w. An image far from every
                    learned task gets w ~ 0: zero-shot CLIP, for tasks not trained yet.

The official SGD lr 5.0, cosine, 10 epochs, batch 128 are the paper-scale presets' settings; the method
runs in one process (its text forward with the batch's prompt is not part of the model's DDP forward).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from .. import dist
from ..config import MethodConfig
from ..errors import ConfigError
from ..models.attention import Prefix, prefix_dim, prefix_slots, prefixed
from ..models.heads import prompt_embeddings
from . import register
from .base import Capabilities, Method

ENCODERS = ("image", "text")


class DIKIConfig(MethodConfig):
    depth: int = Field(8, ge=1, description="prompted blocks from the first, in each encoder (fewer if it has fewer)")
    length: int = Field(8, ge=1, description="prefix tokens per block")
    divisor: float = Field(512.0, gt=0, description="w = sigmoid(log p / divisor - 1) (official: 512)")
    cov_eps: float = Field(1e-7, ge=0, description="added to each Gaussian's covariance diagonal")


def gaussian(feats: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (+ eps I) of the rows of `feats`, float64."""
    f = feats.double()
    mean = f.mean(0)
    d = f - mean
    return mean, d.t() @ d / max(len(f) - 1, 1) + eps * torch.eye(f.shape[1], dtype=f.dtype, device=f.device)


def log_likelihoods(feats: torch.Tensor, means: torch.Tensor, covs: torch.Tensor) -> torch.Tensor:
    """log N(f; mu_k, S_k) of every row of feats (B x d) under every Gaussian (K): B x K, float64."""
    f = feats.double()
    out = []
    for mu, S in zip(means, covs):
        L = torch.linalg.cholesky(S)
        z = torch.linalg.solve_triangular(L, (f - mu).t(), upper=False)
        logdet = 2 * torch.log(torch.diagonal(L)).sum()
        out.append(-0.5 * (z.pow(2).sum(0) + logdet + f.shape[1] * torch.log(torch.tensor(2 * torch.pi))))
    return torch.stack(out, 1)


def prompt_weight(logp: torch.Tensor, divisor: float) -> torch.Tensor:
    return torch.sigmoid(logp / divisor - 1.0)


class DIKIPrompts(nn.Module):
    """Per task and encoder, prefix keys (uniform in [-1, 1)) and values (zero) for each prompted block; the
    per-task Gaussians of frozen image features as buffers. Only the current task's prefixes train."""

    def __init__(self, dims: dict[str, dict[int, int]], tasks: int, length: int, feat_dim: int):
        super().__init__()
        self.keys, self.values = nn.ParameterDict(), nn.ParameterDict()
        for enc, blocks in dims.items():
            for b, c in blocks.items():
                for t in range(tasks):
                    self.keys[f"{enc}_{b}_{t}"] = nn.Parameter(torch.rand(length, c) * 2 - 1)
                    self.values[f"{enc}_{b}_{t}"] = nn.Parameter(torch.zeros(length, c))
        self.dims = dims
        self.register_buffer("means", torch.zeros(tasks, feat_dim, dtype=torch.float64))
        self.register_buffer("covs", torch.zeros(tasks, feat_dim, feat_dim, dtype=torch.float64))
        self.register_buffer("learned", torch.tensor(0))
        self.current = -1

    def trainable(self) -> list[nn.Parameter]:
        if self.current < 0:
            return []
        return [d[f"{e}_{b}_{self.current}"] for d in (self.keys, self.values)
                for e, blocks in self.dims.items() for b in blocks]

    def prefixes(self, enc: str, task: int, n: int, weight: torch.Tensor | None) -> dict[int, Prefix]:
        return {b: Prefix(self.keys[f"{enc}_{b}_{task}"].expand(n, -1, -1),
                          self.values[f"{enc}_{b}_{task}"].expand(n, -1, -1), "residual",
                          None if weight is None else weight.expand(n))
                for b in self.dims.get(enc, {})}


@register
class DIKI(Method):
    """DIKI: per-task residual prefixes in both CLIP encoders, chosen and weighted at test by per-task Gaussians."""

    name = "diki"
    Config = DIKIConfig
    caps = Capabilities(backbones=("open_clip",), export=False, text_head=True)

    def setup(self):
        if dist.world_size() > 1:
            raise ConfigError("method 'diki' runs in one process (its prompted text forward is outside DDP's)")
        bb = self.model.backbone
        self.slots, dims = {}, {}
        for enc, blocks in bb.encoder_blocks().items():
            if enc in ENCODERS:
                self.slots[enc] = prefix_slots(bb, list(range(min(self.cfg.depth, len(blocks)))), enc)
                dims[enc] = {b: prefix_dim(a) for b, a in self.slots[enc].items()}
        self.model.own("diki", DIKIPrompts(dims, len(self.run.scenario.tasks), self.cfg.length, bb.feature_dim))

    @property
    def prompts(self) -> DIKIPrompts:
        return self.model.owned["diki"]

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-length image features of the frozen CLIP (no prefix is set outside `forward`)."""
        with torch.no_grad():
            return F.normalize(self.model.backbone.features(x).float(), dim=-1)

    def begin_task(self, task):
        self.add_task_classes(task)
        feats = []
        self.run.forward_pass(task.train, lambda b: feats.append(self.frozen_features(b.x).cpu()),
                              desc="diki-gaussian", view="test")
        mean, cov = gaussian(torch.cat(feats), self.cfg.cov_eps)
        p = self.prompts
        p.means[task.index], p.covs[task.index] = mean, cov
        p.learned.fill_(task.index + 1)
        p.current = task.index
        self.model.set_trainable("owned")

    def restore(self, task):
        self.prompts.current = task.index
        self.model.apply_trainable()

    def end_task(self, task):
        self.prompts.current = -1
        self.model.apply_trainable()

    def select(self, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The batch's prompt (its images' most frequent best task) and each image's weight."""
        p = self.prompts
        k = int(p.learned)
        logp = log_likelihoods(self.frozen_features(x), p.means[:k], p.covs[:k])
        top, best = logp.max(1)
        return int(torch.bincount(best, minlength=k).argmax()), prompt_weight(top, self.cfg.divisor).float()

    def forward(self, x: torch.Tensor, class_ids: torch.Tensor, task: int, weight: torch.Tensor | None):
        p, bb, head = self.prompts, self.model.backbone, self.model.head
        with prefixed(self.slots.get("image", {}), p.prefixes("image", task, len(x), weight)):
            feats = F.normalize(bb.features(x).float(), dim=-1)
        texts = [head.prompts[int(i)] for i in class_ids]
        n = sum(len(t) for t in texts)
        tw = None if weight is None else weight.mean().reshape(1)
        with prefixed(self.slots.get("text", {}), p.prefixes("text", task, n, tw)):
            emb = prompt_embeddings(bb, texts)
        return bb.logit_scale.exp().float() * feats @ emb.t()

    def loss(self, net, batch, task):
        ids = self.run.classes.train(task)
        return self.cross_entropy(self.forward(batch.x, ids, task.index, None), batch.y, ids)

    def logits(self, x, class_ids):
        if int(self.prompts.learned) == 0:
            return self.model(x, class_ids)  # zero-shot CLIP
        task, w = self.select(x)
        return self.forward(x, class_ids, task, w)
