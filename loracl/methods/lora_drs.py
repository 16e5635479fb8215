"""LoRA-DRS: LoRA subtraction for a drift-resistant space (Liu & Chang, CVPR 2025; BASELINES.md section 6).

One LoRA (rank 10) on the key and value projections of every block, new for every task and merged into the
weights after it, so the trained model is W = W0 + prev with prev the sum of the old tasks' LoRAs. For task t:

    1. t > 0: C = (1/N) sum x x^T of every attention layer's input over the task's training images, computed by
       the subtracted model W0 - prev (LoRA subtraction; `subtract` scales prev, 0 gives the pretrained model)
    2. T = U U^T / ||U U^T||_F with U the eigenvectors of C holding 99% of its energy (the drift-resistant space)
    3. train a fresh LoRA (kaiming down, zero up) and the task's head columns with Adam, each LoRA update
       projected: down (r x d) <- u T, up (d x r) <- T u, as the official Adam variant does with Adam's step
    4. loss = CE over the task's classes + lambda * augmented triplet loss (normalised features; the hardest
       negative may be a stored prototype of an old class)
    5. merge the LoRA; store the class means of the task's training features (test transforms)

Prediction: nearest class mean, cosine between normalised features and normalised prototypes (the official
squared Euclidean distance between unit vectors ranks classes the same way). Which space: the official code
(and LibContinual's port) keep the leading 99% eigen-space, not its complement (docs/lora-drs.md).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..cl.drs import ProjectedUpdates, augmented_triplet_loss, drift_resistant_projector, shifted_weights
from ..cl.statistics import class_feature_statistics, forward_until, layer_input_moments, prototype_logits
from ..errors import ConfigError, LoraclError
from ..models.lora import task_tag
from . import register
from .base import Capabilities, LoRAOptions, Method


class LoRADRSConfig(LoRAOptions):
    rank: int = Field(10, ge=1)
    targets: list[str] = Field(default_factory=lambda: ["k", "v"], description="projections that get the LoRA")
    threshold: float = Field(0.99, gt=0, le=1, description="energy of the input second moment U must hold")
    space: Literal["principal", "complement"] = Field(
        "principal", description="updates kept in the 99% space (official) or in its complement")
    normalise: bool = Field(True, description="divide the projector by its Frobenius norm (official)")
    subtract: float = Field(1.0, description="statistics model W0 - subtract * prev (1: the paper's subtraction, "
                                             "0: the pretrained model, -1: the current model)")
    lam: float = Field(0.05, ge=0, description="weight of the augmented triplet loss (official 'lambada')")
    margin: float = Field(1.0, ge=0, description="triplet margin (official 'margin_inter')")


@register
class LoRADRS(Method):
    """LoRA-DRS (CVPR 2025): LoRA updates projected into the input space of the LoRA-subtracted model, triplet
    loss with old prototypes, nearest-class-mean prediction."""

    name = "lora-drs"
    Config = LoRADRSConfig
    caps = Capabilities(backbones=("timm",), scenarios=("class-incremental", "cross-dataset"), lora=True,
                        all_params_every_step=True, export=False)  # its classifier is the prototypes

    def setup(self):
        adapter = self.model.inject_lora(self.cfg)
        bad = [s.name for s in adapter.sites if s.d_out != s.d_in]
        if bad:
            raise ConfigError(f"lora-drs projects the up-projection's update with the d_in x d_in projector "
                              f"(official code), which needs square weights; not {', '.join(bad)}")
        self.prev = [torch.zeros(s.d_out, s.d_in, device=self.model.device) for s in adapter.sites]
        self.projection = ProjectedUpdates()
        self.transforms: dict = {}  # adapted layer -> d x d update projector of the current task
        d = self.model.backbone.feature_dim
        self.ids = torch.zeros(0, dtype=torch.long)
        self.means = torch.zeros(0, d, dtype=torch.float64)
        self._device_protos = None

    # ---- per task --------------------------------------------------------------------------------------
    def begin_task(self, task):
        self.add_task_classes(task)
        adapter = self.model.adapter
        C = self.subtracted_moments(task) if task.index > 0 else None
        tag = task_tag(task.index)
        adapter.add_fresh(self.cfg.rank, self.cfg.scale, tag)
        self.model.set_trainable("lora+head", head=task.class_ids if hasattr(self.model.head, "chunk_of") else None)
        self.transforms = {}
        if C is not None:  # the first task trains with plain Adam
            self.transforms = {layer: drift_resistant_projector(C[layer], self.cfg.threshold, self.cfg.space,
                                                                self.cfg.normalise) for layer in adapter.layers}
            dims = sorted(int(torch.linalg.matrix_rank(T.double(), rtol=1e-4).item()) for T in self.transforms.values())
            self.run.log(f"  lora-drs: {self.cfg.space} space dims per layer min {dims[0]} / median "
                         f"{dims[len(dims) // 2]} / max {dims[-1]} of {adapter.layers[0].d_in}")
        self.restore(task)

    def restore(self, task):
        """(Re)attach the projection to the task's LoRA factors (a resume may have rebuilt them)."""
        self.projection.stop()
        if not self.transforms:
            return
        tag = task_tag(task.index)
        for layer, T in self.transforms.items():
            for site in self.model.adapter.sites_of(layer):
                br = site.branches[tag]
                self.projection.add(br.down, right=T.to(br.down.device))
                self.projection.add(br.up, left=T.to(br.up.device))
        self.projection.start()

    def loss(self, net, batch, task):
        ids = self.run.classes.train(task)
        logits, feats = net(batch.x, ids, return_features=True)
        loss = self.cross_entropy(logits, batch.y, ids)
        if not self.cfg.lam:
            return loss
        protos = self.prototypes()[1] if len(self.ids) else None
        atl = augmented_triplet_loss(F.normalize(feats.float(), dim=-1), batch.y, protos, self.cfg.margin)
        return loss + self.cfg.lam * atl

    @torch.no_grad()
    def end_task(self, task):
        self.projection.stop()
        tag = task_tag(task.index)
        for k, site in enumerate(self.model.adapter.sites):
            self.prev[k] += site.branches[tag].delta_weight().float()
        self.model.adapter.merge_all()
        s = class_feature_statistics(self.run, self.model, task.train, task.class_ids, "drs-prototypes",
                                     covariance=False)
        self.ids = torch.cat([self.ids, torch.as_tensor(list(task.class_ids), dtype=torch.long)])
        self.means = torch.cat([self.means, s.means.double().cpu()])
        self._device_protos = None

    # ---- prediction ------------------------------------------------------------------------------------
    def prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._device_protos is None:
            dev = self.model.device
            self._device_protos = (self.ids.to(dev), self.means.float().to(dev))
        return self._device_protos

    def logits(self, x, class_ids):
        """Cosine to the stored prototypes; classes without one yet score -inf."""
        ids, protos = self.prototypes()
        out = prototype_logits(lambda: self.model.features(x), class_ids, ids, protos, self.run.classes.columns)
        return super().logits(x, class_ids) if out is None else out

    def state_dict(self):
        return {"prev": [p.cpu() for p in self.prev], "ids": self.ids, "means": self.means}

    def load_state_dict(self, state):
        dev = self.model.device
        self.prev = [p.to(dev, torch.float32) for p in state["prev"]]
        self.ids, self.means = state["ids"].long(), state["means"].double()
        self._device_protos = None

    # ---- pieces -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def subtracted_moments(self, task) -> dict:
        """C of every adapted layer over the task's training images, computed by the model W0 - subtract * prev
        (the merged weights are W0 + prev), fp32, eval mode; the weights are restored exactly afterwards."""
        adapter = self.model.adapter
        layers = adapter.layers
        was_training = self.model.training
        self.model.eval()
        dev = self.model.device.type
        shift = [-(1.0 + self.cfg.subtract) * p for p in self.prev]
        with shifted_weights(adapter.sites, shift), layer_input_moments(layers) as acc, \
                forward_until(layers) as run:
            def fn(batch):
                with torch.autocast(dev, enabled=False):
                    run(lambda: self.model.features(batch.x))

            self.run.forward_pass(task.train, fn, desc="drs-stats", view="stats")
        self.model.train(was_training)
        if any(float(acc[layer].count) == 0 for layer in layers):
            raise LoraclError("lora-drs: an adapted layer saw no input during the statistics pass")
        return {layer: acc[layer].finalize().double().cpu() for layer in layers}
