"""MoE-Adapters: a mixture of adapter experts with one router per task and a distribution-aware selector that
sends unfamiliar images to zero-shot CLIP (Yu et al., CVPR 2024, "Boosting Continual Learning of Vision-Language
Models via Mixture-of-Experts Adapters"; official code JiazuoYu/MoE-Adapters4CL, `mtil/clip/model.py`,
`mtil/src/models/finetune.py`, `mtil/src/models/AutoEncoder.py`, `mtil/src/models/evaluation.py`,
`scripts/train/train_full_shot_router11_experts22_1000iters.sh`; BASELINES.md 5).

    setup:      in every block of both encoders, beside the MLP: 22 AdaptFormer experts (width 64, scale 0.1,
                dropout 0.1, up-projection zero) and one noisy top-2 router per task (zero-initialised);
                models/moe.py holds the gating and the cv^2 balance loss
    task t:     router t and every expert not yet frozen train; CLIP stays frozen; loss = CE with label
                smoothing 0.2 + balance * sum over sites of cv^2(importance) + cv^2(load)
    end of t:   per site, the 2 experts router t chose most often in the task freeze for good (activate-freeze);
                DDAS: an autoencoder on sigmoid(zero-shot CLIP image feature) of task t's training images, 300
                steps (after task 0 also the reference set's, 1000 steps: slot 0)
    test:       each image's reconstruction error under every trained autoencoder; the best slot's router
                serves it (both encoders: class prompts through the same router), unless the best is the
                reference set's or its error exceeds 0.0655: then zero-shot CLIP, adapters off, exactly

Differences from the official code, all stated in docs/moe-adapters.md: its DDAS reads AlexNet conv5 features
(the 0.0655 threshold was set on those), here the zero-shot CLIP image feature; its router and experts read the
block's residual stream before ln_2, here the MLP's input (after ln_2: the `mlp` site); it selects one router per
test batch (the batch's mean error), here per image; it computes the cv^2 loss but never adds it (`balance: 0`
reproduces that). Autoencoder training as the official: Adam, weight decay 1e-4, lr 0.01 divided by 10 every 10
epochs of the set, batch 64.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from .. import dist
from ..cl.memory import EpisodicMemory
from ..config import DatasetSpec, MethodConfig
from ..data.registry import load_dataset
from ..errors import ConfigError
from ..models.moe import AutoencoderBank, ExpertMixture
from . import register
from .base import Capabilities, LoRAOptions, Method
from .ranpac import task_features

TAG = "moe"


class MoEAdaptersConfig(MethodConfig):
    experts: int = Field(22, ge=1, description="adapter experts per block and encoder")
    width: int = Field(64, ge=1, description="bottleneck width of an expert (the official ffn_num)")
    scale: float = Field(0.1, description="an expert's output scale (adapter_scalar)")
    dropout: float = Field(0.1, ge=0, lt=1)
    top_k: int = Field(2, ge=1)
    balance: float = Field(1e-2, ge=0, description="weight of the cv^2 balance loss (the official code: computed, "
                                                   "not added: 0)")
    freeze_top: int = Field(2, ge=0, description="experts per site frozen after each task (most often chosen)")
    label_smoothing: float = Field(0.2, ge=0, lt=1)
    ddas: bool = Field(True, description="route by autoencoders (false: every image through the last router)")
    threshold: float = Field(0.0655, gt=0, description="reconstruction error above which an image goes zero-shot")
    reference: DatasetSpec | None = Field(None, description="reference images for DDAS's slot 0 (ImageNet at "
                                                            "paper scale; Tiny-ImageNet here); None: no slot 0")
    ref_steps: int = Field(1000, ge=1, description="autoencoder steps on the reference images")
    ae_steps: int = Field(300, ge=1, description="autoencoder steps on a task's training images")
    ae_code: int = Field(100, ge=1, description="autoencoder code width")
    ae_lr: float = Field(0.01, gt=0)
    ae_decay_epochs: int = Field(10, ge=0, description="autoencoder lr / 10 every this many epochs of its set "
                                                       "(the official 10; 0: constant)")
    ae_batch: int = Field(64, ge=1)


@register
class MoEAdapters(Method):
    """MoE-Adapters: routed adapter experts per task, activate-freeze, autoencoders send unseen data to zero-shot."""

    name = "moe-adapters"
    Config = MoEAdaptersConfig
    caps = Capabilities(backbones=("open_clip",), export=False, text_head=True)  # routes per image at test

    def check(self):
        if self.cfg.top_k > self.cfg.experts:
            raise ConfigError(f"method.top_k ({self.cfg.top_k}) exceeds method.experts ({self.cfg.experts})")

    def setup(self):
        c, clip, tasks = self.cfg, self.model.backbone.model, len(self.run.scenario)
        batch_first = {"image": getattr(clip.visual.transformer, "batch_first", True),
                       "text": getattr(clip.transformer, "batch_first", True)}
        for s in self.model.inject_lora(LoRAOptions(targets=["mlp"])).sites:
            s.add(ExpertMixture(s.d_in, c.experts, c.width, c.scale, c.dropout, tasks, c.top_k,
                                batch_first[s.encoder], split=s.encoder == "image"), TAG)
        self.bank = self.model.own("ddas", AutoencoderBank(self.model.backbone.feature_dim, tasks + 1, c.ae_code))
        self._counts = None

    @property
    def mixtures(self) -> list[ExpertMixture]:
        return [s.branches[TAG] for s in self.model.adapter.sites]

    # ---- training ------------------------------------------------------------------------------------
    def begin_task(self, task):
        self.add_task_classes(task)
        for m in self.mixtures:
            m.learning = task.index
            m.set_route(task.index)
            m.counts.zero_()
        self.model.set_trainable("lora")  # the experts and router t (param_groups leaves the frozen experts out)

    def restore(self, task):
        if self._counts is not None:
            for m, n in zip(self.mixtures, self._counts):
                m.counts = n.clone()

    def param_groups(self, task):  # what the model declares, less the frozen experts
        frozen = {id(p) for m in self.mixtures for p in m.frozen_parameters()}
        return {g: [p for p in ps if id(p) not in frozen] for g, ps in self.model.param_groups().items()}

    def after_backward(self, task):  # frozen experts: their gradients never reach a step
        for m in self.mixtures:
            for p in m.frozen_parameters():
                p.grad = None

    def loss(self, net, batch, task):
        for m in self.mixtures:
            m.aux.clear()
        ids = self.run.classes.train(task)
        loss = self.cross_entropy(net(batch.x, ids), batch.y, ids, label_smoothing=self.cfg.label_smoothing)
        aux = [a for m in self.mixtures for a in m.aux]
        if self.cfg.balance and aux:
            loss = loss + self.cfg.balance * torch.stack(aux).sum()
        for m in self.mixtures:
            m.aux.clear()
        return loss

    def end_task(self, task):
        mixtures = self.mixtures
        counts = dist.all_reduce_sum_(torch.stack([m.counts for m in mixtures]).to(self.model.device)).cpu()
        for m, n in zip(mixtures, counts):  # activate-freeze: the experts this task's router used most
            m.frozen = sorted(set(m.frozen) | set(n.topk(min(self.cfg.freeze_top, len(n))).indices.tolist()))
            m.learning = -1
        self.model.set_trainable("none")
        self.run.record("frozen_experts", task.index, sum(len(m.frozen) for m in mixtures))
        if self.cfg.ddas:
            with self.run.cost.timed("ddas"):
                if task.index == 0 and self.cfg.reference is not None:
                    self._train_reference()
                self._train_task_autoencoder(task)

    # ---- DDAS ----------------------------------------------------------------------------------------
    def zero_shot_features(self, x: torch.Tensor) -> torch.Tensor:
        with self.model.adapter.inactive():
            return self.model.features(x).float()

    def _fit_autoencoder(self, slot: int, steps: int, epoch_len: int, draw) -> None:
        """`steps` Adam steps of slot's autoencoder on feature batches `draw(step, generator)`; the official
        schedule: lr / 10 every `ae_decay_epochs` epochs of `epoch_len` batches."""
        ae, gen = self.bank.aes[slot], torch.Generator().manual_seed(self.run.seed("ddas", slot))
        params = list(ae.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=self.cfg.ae_lr, weight_decay=1e-4)
        was_training, last = self.model.training, None
        self.model.eval()
        for step in range(steps):
            decay = self.cfg.ae_decay_epochs
            for g in opt.param_groups:
                g["lr"] = self.cfg.ae_lr * (0.1 ** ((step // max(epoch_len, 1)) // decay) if decay else 1.0)
            feats = draw(step, gen)

            def one_step():
                opt.zero_grad(set_to_none=True)
                with torch.enable_grad(), torch.autocast(self.model.device.type, enabled=False):
                    loss = self.bank.reconstruction_error(slot, feats).mean()
                    loss.backward()
                opt.step()
                return loss.detach()

            last = self.run.cost.counted("ddas", len(feats), one_step, replicated=True)  # alike in every process
        for p in params:
            p.requires_grad_(False)
        self.bank.trained[slot] = True
        self.model.train(was_training)
        self.run.log(f"moe-adapters: DDAS slot {slot}: reconstruction error {float(last):.4f} after {steps} steps")

    def _train_reference(self) -> None:
        refs = EpisodicMemory.over(load_dataset(self.cfg.reference).train)
        n, b = len(refs.pool), self.cfg.ae_batch

        def draw(step, gen):
            rows = torch.randint(n, (b,), generator=gen).numpy()
            x = self.run.memory_batch(refs, rows).x
            return self.run.cost.counted("ddas-features", b, lambda: self.zero_shot_features(x).detach(),
                                         replicated=True)

        self._fit_autoencoder(0, self.cfg.ref_steps, n // b, draw)

    def _train_task_autoencoder(self, task) -> None:
        with self.model.adapter.inactive():
            feats, _ = task_features(self, task.train, "ddas-features")
        feats, b = feats.to(self.model.device), self.cfg.ae_batch
        epoch_len, order = math.ceil(len(feats) / b), None

        def draw(step, gen):
            nonlocal order
            k = step % epoch_len
            if k == 0:
                order = torch.randperm(len(feats), generator=gen)
            return feats[order[k * b:(k + 1) * b].to(feats.device)]

        self._fit_autoencoder(task.index + 1, self.cfg.ae_steps, epoch_len, draw)

    def select(self, feats: torch.Tensor) -> torch.Tensor:
        """Per image, the task whose router serves it, or -1 for zero-shot CLIP."""
        err = self.bank.errors(feats)
        best, slot = err.min(1)
        return torch.where((slot == 0) | (best > self.cfg.threshold) | ~torch.isfinite(best), 0, slot) - 1

    # ---- test ----------------------------------------------------------------------------------------
    def logits(self, x, class_ids):
        with self.model.adapter.inactive():
            feats = self.model.features(x)
            out = self.model.head(feats, class_ids).float()
        if self.cfg.ddas:
            route = self.select(feats)
        else:
            route = torch.full((len(x),), int(self.mixtures[0].route), device=x.device)  # the last trained
        for t in torch.unique(route).tolist():
            if t < 0:
                continue
            rows = torch.nonzero(route == t).flatten()
            for m in self.mixtures:
                m.set_route(t)
            out[rows] = self.model(x.index_select(0, rows.to(x.device)), class_ids).float()
        return out

    def state_dict(self):  # mid-task: how often each expert was chosen so far (the freeze reads it)
        return {"counts": [m.counts.clone() for m in self.mixtures]}

    def load_state_dict(self, state):
        self._counts = state.get("counts")
