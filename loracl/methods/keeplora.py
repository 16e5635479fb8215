"""KeepLoRA: continual learning with residual gradient adaptation (Luo et al., ICLR 2026).

General knowledge of the pretrained model lives in the principal subspace of its weights, knowledge of learnt
tasks in the dominant directions of their features. KeepLoRA restricts each task's LoRA update to the input
directions orthogonal to both (the residual subspace), and points it along the task's gradient there.

Once, before the first task (`principal_subspace`):
    M = leading singular vectors of each adapted W holding eps_w of its energy (image 0.85, text 0.2)
Per task t:
    1. G = mean gradient of the task's loss w.r.t. each adapted W, LoRA off          (estimate_gradients)
    2. G_hat = (I - M M^T) G^T; rank-r randomised SVD G_hat ~ U S V^T
       A = U (fixed), B = S V^T (trained); W <- W - s (A B)^T: same function     (residual_gradient_init)
    3. train B (and, KeepLoRA+, a cosine head initialised from class means)
    4. W <- W + s (A B)^T                                                        (end_task: merge)
    5. features of the task through the merged model; M grows by GPM, eps_f 0.99 (grow_protected_subspace)

Because A has orthonormal columns inside the residual subspace and is never trained, every change of W is
dW = s dB^T A^T: its rows lie in span(A), so dW M = 0 and the protected inputs keep their outputs.

`variant` (METHODS.md section 2):
- official (the MTIL code, default): M starts from U of W (the output space of the out x in matrix, used on
  the input side: the q/k/v/out matrices are square); G averaged over every batch of the task; features as
  the MTIL code accumulates them, the running mean of equal-sized per-batch token matrices (`batch-mean`).
- paper: M starts from the right singular vectors (the input space); G from the first step (one batch);
  features as the full token matrix (`tokens`, energy of its squared singular values).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from .. import dist
from ..cl.statistics import BatchMeanFeatures, ClassMeans, forward_until, layer_input_moments, tapped
from ..cl.subspace import (
    gpm_extend,
    gpm_first,
    principal_basis,
    project_out,
    psd_sqrt,
    residual_factors,
)
from ..errors import ConfigError
from ..models.heads import LinearHead
from ..models.lora import task_tag
from . import register
from .base import Capabilities, LoRAOptions, Method, Variant


class KeepLoRAConfig(LoRAOptions):
    rank: int = Field(16, ge=1)
    alpha: float | None = Field(1.0, description="scale = alpha / rank (official: 1 / 16)")
    targets: list[str] = Field(default_factory=lambda: ["q", "k", "v", "out"])
    variant: Literal["official", "paper"] = "official"
    eps_w: dict[str, float] = Field(default_factory=lambda: {"image": 0.85, "text": 0.2},
                                    description="energy of each encoder's pretrained weights kept as principal "
                                                "subspace (0: none)")
    eps_f: float = Field(0.99, description="GPM threshold of the features of learnt tasks")
    grad_batches: int | None = Field(None, ge=1, description="batches of the gradient estimate (None: all for "
                                                             "official, 1 for paper)")
    features: Literal["batch-mean", "tokens"] | None = Field(None, description="feature matrix of the GPM "
                                                                                "update (None: by variant)")
    plus: bool = Field(False, description="KeepLoRA+: a per-dataset cosine head from class-mean features, added "
                                          "to the logits")
    cosine_scale: float = Field(30.0, gt=0, description="KeepLoRA+ cosine head scale")

    @field_validator("eps_w")
    @classmethod
    def _encoders(cls, v):
        if not set(v) <= {"image", "text"} or not all(0.0 <= x <= 1.0 for x in v.values()):
            raise ValueError("eps_w maps 'image' / 'text' to energies in [0, 1]")
        return v

    @field_validator("eps_f")
    @classmethod
    def _unit(cls, v):
        if not 0.0 < v <= 1.0:
            raise ValueError("eps_f must be in (0, 1]")
        return v


@register
class KeepLoRA(Method):
    """KeepLoRA: LoRA initialised from the task gradient projected off the principal and learnt subspaces."""

    name = "keeplora"
    Config = KeepLoRAConfig
    caps = Capabilities(lora=True, all_params_every_step=True)
    variants = {"keeplora+": Variant("KeepLoRA+: KeepLoRA plus a per-dataset cosine head initialised from "
                                     "class-mean image features.", settings={"plus": True})}

    def __init__(self, cfg, run):
        super().__init__(cfg, run)
        self.bases: dict[str, torch.Tensor | None] = {}  # protected input subspace M of each site
        self.cosine: LinearHead | None = None

    @property
    def side(self) -> str:
        return "left" if self.cfg.variant == "official" else "right"

    @property
    def feature_kind(self) -> str:
        return self.cfg.features or ("batch-mean" if self.cfg.variant == "official" else "tokens")

    # ---- once ----------------------------------------------------------------------------------------
    def setup(self):
        c = self.cfg
        self.model.inject_lora(c)
        if c.plus:  # owned by the model: DDP averages its gradients, checkpoints hold it
            self.cosine = self.model.own("keeplora+ cosine head", LinearHead(
                self.model.backbone.feature_dim, cosine=True, scale=c.cosine_scale))
        self.principal_subspace()

    @torch.no_grad()
    def principal_subspace(self) -> None:
        """Initial M of every site: the principal subspace of its pretrained weight (step 1)."""
        for s in self.model.adapter.sites:
            W = s.weight().detach().float()
            if self.side == "left" and W.shape[0] != W.shape[1]:
                raise ConfigError(f"keeplora variant 'official' uses the output-space basis of {s.name} on its "
                                  f"input side, which needs a square weight (it is {tuple(W.shape)}); use "
                                  f"method.variant: paper or targets q, k, v, out")
            eps = self.cfg.eps_w.get(s.encoder, 0.0)
            # the official code skips thresholds <= 1e-8: M then starts empty and the first GPM update seeds it
            self.bases[s.name] = principal_basis(W, eps, side=self.side) if eps > 1e-8 else None

    # ---- per task ------------------------------------------------------------------------------------
    def begin_task(self, task):
        self.add_task_classes(task)
        means = (ClassMeans(self.run.classes, task.class_ids, self.model.backbone.feature_dim, self.model.device)
                 if self.cosine is not None else None)
        # KeepLoRA+'s class means need the features of the same function the gradient pass computes: when
        # that pass sees every training image, its forward gives them (one pass over the task instead of two)
        shared = means is not None and self.gradient_rows(task) is None
        grads = self.estimate_gradients(task, means if shared else None)
        self.residual_gradient_init(grads, task_tag(task.index))
        del grads
        if self.cosine is not None:
            self.init_cosine_head(task, means, done=shared)
            self.cosine.learning = list(task.class_ids)  # its chunk for this dataset trains
        self.model.set_trainable("lora+head+owned")

    def gradient_rows(self, task) -> np.ndarray | None:
        """Rows of the task's training set the gradient is averaged over (None: all)."""
        k = self.cfg.grad_batches or (None if self.cfg.variant == "official" else 1)
        n = len(task.train)
        bs = self.run.batch_size
        if k is None or k * bs >= n:
            return None
        perm = np.random.default_rng(self.run.seed("keeplora-gradient", task.index)).permutation(n)
        return np.sort(perm[: k * bs])

    def estimate_gradients(self, task, means: ClassMeans | None = None) -> dict:
        """Mean gradient of the task's cross-entropy w.r.t. every adapted weight, no LoRA live (step 2).

        Only the adapted weights require grad: their gradient is the same as with every encoder weight
        trainable (the official code), and the per-batch gradients accumulate in place in `.grad`, so the
        pass holds one set of full-weight gradients whatever the number of batches. `means`, if given, also
        collects the image features of the same forward."""
        self.model.set_trainable("none")
        weights = []
        for layer in self.model.adapter.layers:
            if all(layer.weight is not w for w in weights):
                weights.append(layer.weight)
        for w in weights:
            w.grad = None
            w.requires_grad_(True)
        rows = self.gradient_rows(task)
        images = task.train if rows is None else task.train.subset(rows)
        n = len(images)
        ids = self.run.classes.train(task)

        def accumulate(b):
            logits, feats = self.model(b.x, ids, return_features=True)
            if means is not None:
                means.add(feats.detach(), b.y)
            # dataset mean: each batch weighted by its size (the official loader's equal batches give the same)
            loss = self.cross_entropy(logits, b.y, ids) * (len(b.y) / n)
            loss.backward()

        self.run.forward_pass(images, accumulate, desc="keeplora-gradient", grad=True, batch_size=self.run.batch_size)
        grads = {}
        for layer in self.model.adapter.layers:
            grads[layer] = layer.weight.grad
            dist.all_reduce_sum_(grads[layer])
        for w in weights:
            w.requires_grad_(False)
            w.grad = None
        return grads

    @torch.no_grad()
    def residual_gradient_init(self, grads: dict, tag: str) -> None:
        """A, B from the rank-r SVD of the gradient projected on the residual subspace; W -= s (A B)^T (step 3)."""
        c = self.cfg
        scale = c.scale
        for s in self.model.adapter.sites:
            a, b = s.layer.slices[s.slice]
            G = grads[s.layer][a:b].float()  # d_out x d_in
            M = self.bases[s.name]
            G_hat = project_out(G.t(), M)  # (I - M M^T) G^T, d_in x d_out
            A, B = residual_factors(G_hat, c.rank, free_dims=s.d_in - (0 if M is None else M.shape[1]))
            if A.shape[1] == 0:
                continue  # nothing of the gradient is left outside the protected subspace
            down, up = A.t().contiguous(), B.t().contiguous()  # our branch: delta W = s * up @ down = s (A B)^T
            s.add_lora(down, up, tag=tag, scale=scale, train_down=False, train_up=True)
            s.add_to_weight(-scale * (up @ down))

    @torch.no_grad()
    def init_cosine_head(self, task, means: ClassMeans, done: bool = False) -> None:
        """KeepLoRA+: a cosine classifier for this dataset, its rows the normalised class means of the
        normalised image features (from the gradient pass when `done`, else through the model with the new
        branches: the same function)."""
        if not done:
            self.run.forward_pass(task.train, lambda b: means.add(self.model.features(b.x), b.y),
                                  desc="keeplora+-class-means")
        ids = list(task.class_ids)
        self.cosine.add_classes(ids)
        self.cosine.set_rows(ids, means.rows())

    def scores(self, net, x, class_ids):
        """The model's logits, plus KeepLoRA+'s cosine logits from the same forward (through DDP in training)."""
        if self.cosine is None:
            return net(x, class_ids)
        logits, feats = net(x, class_ids, return_features=True)
        return logits + self.cosine.logits_if_known(feats, class_ids)  # datasets not yet learnt: text head alone

    def loss(self, net, batch, task):
        ids = self.run.classes.train(task)
        return self.cross_entropy(self.scores(net, batch.x, ids), batch.y, ids)

    def logits(self, x, class_ids):
        return self.scores(self.model, x, class_ids)

    def end_task(self, task):
        self.model.adapter.merge_all()
        if self.cosine is not None:
            self.cosine.learning = None
        self.model.set_trainable("none")
        self.grow_protected_subspace(task)

    # ---- memory --------------------------------------------------------------------------------------
    @torch.no_grad()
    def grow_protected_subspace(self, task) -> None:
        """Feature pass through the merged model (no branches), then GPM growth of every site's M (steps 5-6):
        q/k/v see the block input after the layer norm, out the attention output before the projection; the
        text encoder sees the prompts of the task's classes."""
        sites = self.model.adapter.sites
        layers = {enc: [] for enc in ("image", "text")}
        for layer in self.model.adapter.layers:
            layers[self.model.adapter.sites_of(layer)[0].encoder].append(layer)
        grams: dict = {}
        self.model.eval()
        if layers["image"]:
            kw = dict(desc="keeplora-features", view="stats", batch_size=self.run.batch_size)
            if self.feature_kind == "batch-mean":
                accs = {layer: BatchMeanFeatures(layer.d_in, layer.weight.device) for layer in layers["image"]}
                # whole (global) batches only, as the official drop_last loader
                with tapped(layers["image"], lambda layer: accs[layer].update), \
                        forward_until(layers["image"]) as run:
                    self.run.forward_pass(task.train, lambda b: run(lambda: self.model.features(b.x)),
                                          drop_last=True, **kw)
                grams.update({layer: acc.gram() for layer, acc in accs.items()})
            else:
                with layer_input_moments(layers["image"]) as accs, forward_until(layers["image"]) as run:
                    self.run.forward_pass(task.train, lambda b: run(lambda: self.model.features(b.x)), **kw)
                grams.update({layer: acc.finalize() for layer, acc in accs.items()})
        if layers["text"]:
            # one pass over the prompts: both feature kinds reduce to the token matrix of the prompts here
            with layer_input_moments(layers["text"]) as accs, self.run.cost.timed("keeplora-features"):
                prompts = [p for i in task.class_ids for p in self.model.head.prompts[int(i)]]
                bb = self.model.backbone
                for k in range(0, len(prompts), 256):
                    tok = bb.tokenize(prompts[k:k + 256]).to(self.model.device)
                    self.run.cost.counted("keeplora-text-features", len(tok), lambda: bb.encode_text(tok))
            grams.update({layer: acc.finalize() for layer, acc in accs.items()})
        for s in sites:
            R = psd_sqrt(grams[s.layer].double())  # energies = squared singular values of the feature matrix
            M = self.bases[s.name]
            new = gpm_first(R, self.cfg.eps_f) if M is None else gpm_extend(M.double(), R, self.cfg.eps_f)
            self.bases[s.name] = new.float().contiguous()
        for enc in ("image", "text"):
            dims = [self.bases[s.name].shape[1] for s in sites if s.encoder == enc]
            if dims:
                d = next(s.d_in for s in sites if s.encoder == enc)
                self.run.log(f"  keeplora: protected input directions ({enc}): {min(dims)}-{max(dims)} of {d} "
                             f"(mean {sum(dims) / len(dims):.1f})")

    def protected_dims(self) -> dict[str, int]:
        return {k: (0 if v is None else int(v.shape[1])) for k, v in self.bases.items()}

    def state_dict(self):
        return {"bases": {k: (None if v is None else v.cpu()) for k, v in self.bases.items()}}

    def load_state_dict(self, state):
        dev = self.model.device
        self.bases = {k: (None if v is None else v.to(dev)) for k, v in state["bases"].items()}
