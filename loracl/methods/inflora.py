"""InfLoRA: interference-free low-rank adaptation (Liang & Li, CVPR 2024; METHODS.md section 1).

Every adapted layer `W` (by default the key and value projections of every block, which share one input)
gets per task t a branch `W + A_t B_t`. For each task:

    1. C_t   = (1/N) sum x x^T over every input token of the layer (current model, training transforms, fp32)
    2. B_t   = design_down_projection(C_t, free space of the memory)   frozen, orthogonal to old tasks' inputs
    3. train A_t (zero-initialised, k and v) and the task's linear head, cross-entropy over the task's classes
    4. merge A_t B_t into W  (the official code instead keeps every branch and sums them in each forward)
    5. C_t again, with the trained model -> DualGPM update of the layer's memory (GPM for InfLoRA-b5); energy on
       the squared singular values of C_t (official code) or of the input matrix H_t (the paper)

Because B_t's rows lie in the complement of the memory, `W x` is unchanged for every input x in the old
tasks' subspace, whatever A_t learns: that is the interference-free property.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..cl.statistics import forward_until, layer_input_moments
from ..cl.subspace import INV_SQRT3, DualGPM, psd_sqrt
from ..errors import LoraclError
from ..models.lora import task_tag
from . import register
from .base import Capabilities, LoRAOptions, Method, Variant


def design_down_projection(C: torch.Tensor, free: torch.Tensor | None, rank: int,
                           variant: str = "official") -> torch.Tensor | None:
    """The frozen down-projection B_t (rank x d) of one layer, or None when the layer has no free space left.

    `C` is the layer's input second moment, `free` an orthonormal basis (d x k) of the space not claimed by
    earlier tasks (None before the first task: everything is free).
    - official: top-r left singular vectors of the projected covariance `(I - M M^T) C` (`F F^T C` for a
      "retain" memory), divided by sqrt(3).
    - paper: top-r left singular vectors of the projected input matrix `(I - M M^T) H`, i.e. the top
      eigenvectors of `P C P` with P the projector on the free space; no scale.
    Both are computed in the coordinates of F: `F F^T C = F (F^T C)` and F has orthonormal columns, so the
    singular vectors are F times those of `F^T C`. This is the same subspace the official SVD finds, but its
    rows lie in span(F) exactly, also when fewer than r free directions carry energy.
    """
    C = C.double()
    F = None if free is None else free.double()
    k = C.shape[0] if F is None else F.shape[1]
    r = min(rank, k)
    if r == 0:
        return None
    if variant == "official":
        X = C if F is None else F.t() @ C
        U, _, _ = torch.linalg.svd(X, full_matrices=False)
        dirs, scale = U[:, :r], INV_SQRT3
    elif variant == "paper":
        X = C if F is None else F.t() @ C @ F
        evals, evecs = torch.linalg.eigh((X + X.t()) / 2)
        dirs, scale = evecs[:, torch.argsort(evals, descending=True)[:r]], 1.0
    else:
        raise ValueError(f"unknown InfLoRA variant '{variant}' (official or paper)")
    if F is not None:
        dirs = F @ dirs
    return (dirs.t() * scale).float().contiguous()


class InfLoRAConfig(LoRAOptions):
    rank: int = Field(10, ge=1)
    targets: list[str] = Field(default_factory=lambda: ["k", "v"], description="projections that get branches")
    eps: float = Field(0.95, gt=0, lt=1, description="DualGPM energy threshold of the first task")
    variant: Literal["official", "paper"] = Field("official", description="design of B_t (METHODS.md 1.2)")
    memory: Literal["dualgpm", "gpm"] = Field("dualgpm", description="gpm: 'remove' bases only (InfLoRA-b5, DomainNet)")
    energy: Literal["covariance", "input"] | None = Field(
        None, description="DualGPM energy: squared singular values of C (official code) or of the input matrix H "
                          "(the paper, as GPM: eigenvalues of C); default: by variant")
    merge: bool = Field(True, description="merge each task's branch into W; false: keep and sum all (official code)")


def layer_key(sites) -> str:
    s = sites[0]
    return f"{s.encoder}.{s.block}.{'+'.join(x.kind for x in sites)}"


@register
class InfLoRA(Method):
    """InfLoRA (CVPR 2024): designed frozen down-projections orthogonal to old tasks' inputs, DualGPM memory."""

    name = "inflora"
    Config = InfLoRAConfig
    caps = Capabilities(lora=True, all_params_every_step=True)
    variants = {
        "inflora-b5": Variant("InfLoRA-b5: branches on the first five blocks only, plain GPM memory (the paper's "
                              "cheaper variant).", settings={"blocks": [0, 1, 2, 3, 4], "memory": "gpm"}),
        # the official code's InfLoRA_CA (BASELINES.md section 1): plain GPM ("remove" bases only) and classifier
        # alignment after every task; its optimiser (SGD, cosine per epoch) and ranks (5 on CIFAR-100, 10 on
        # ImageNet-R) are in the presets inflora-ca-cifar100 / inflora-ca-imagenet-r-10
        "inflora-ca": Variant("InfLoRA-CA (official InfLoRA_CA): InfLoRA with plain GPM and classifier alignment of "
                              "all heads after each task.", settings={"rank": 5, "memory": "gpm"},
                              run={"align": {"enabled": True}}),
    }

    def setup(self):
        c = self.cfg
        adapter = self.model.inject_lora(c)
        self.layers = {layer_key(adapter.sites_of(layer)): layer for layer in adapter.layers}
        self.memory = DualGPM(c.eps, len(self.run.scenario), dual=c.memory == "dualgpm")

    # ---- per task --------------------------------------------------------------------------------------
    def begin_task(self, task):
        self.add_task_classes(task)
        C = self.input_moments(task, "stats-before")
        skipped = []
        for key, layer in self.layers.items():
            down = design_down_projection(C[key], self.memory.free_basis(key), self.cfg.rank, self.cfg.variant)
            if down is None:
                skipped.append(key)
                continue
            for site in self.model.adapter.sites_of(layer):
                site.add_lora(down, torch.zeros(site.d_out, down.shape[0]), tag=task_tag(task.index),
                              scale=self.cfg.scale, train_down=False, train_up=True)
        if skipped:
            self.run.log(f"  inflora: no free input directions left in {', '.join(skipped)}; no branch this task")
        # only the live up-projections (A_t) and, with per-task linear heads, the task's own chunk (as the
        # official classifier pool); CLIP's text head has nothing to train
        self.model.set_trainable("lora+head", head=task.class_ids if hasattr(self.model.head, "chunk_of") else None)

    def end_task(self, task):
        if self.cfg.merge:
            self.model.adapter.merge_all()
        else:  # official: the branch stays live, frozen, and is summed with the others in every forward
            self.model.adapter.freeze(task_tag(task.index))
        C = self.input_moments(task, "stats-after")
        # the official code runs DualGPM on C itself, so energy is its squared eigenvalues; the paper (like GPM)
        # runs it on the input matrix H, whose squared singular values are C's eigenvalues: C^(1/2) has the same
        # left singular vectors and residuals as H / sqrt(N), so it stands in for H exactly.
        energy = self.cfg.energy or ("covariance" if self.cfg.variant == "official" else "input")
        for key in self.layers:
            self.memory.update(key, C[key] if energy == "covariance" else psd_sqrt(C[key]), task.index)
        self.log_memory(task)

    def state_dict(self):
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state):
        self.memory.load_state_dict(state["memory"])

    # ---- pieces -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def input_moments(self, task, desc: str) -> dict[str, torch.Tensor]:
        """C of every adapted layer over the task's training set (float64 on the CPU, summed over processes).

        The forward runs in fp32 even under mixed precision (the official code has no AMP), in eval mode.
        """
        was_training = self.model.training
        self.model.eval()
        dev = self.model.device.type

        layers = list(self.layers.values())
        image_layers = [layer for layer in layers if self.model.adapter.sites_of(layer)[0].encoder != "text"]

        with layer_input_moments(layers) as acc, forward_until(image_layers) as run:
            def fn(batch):
                with torch.autocast(dev, enabled=False):
                    run(lambda: self.model.features(batch.x))

            self.run.forward_pass(task.train, fn, desc=desc, view="stats")
            self.text_pass(task)
        self.model.train(was_training)
        out = {}
        for key, layer in self.layers.items():
            C = acc[layer].finalize()
            if float(acc[layer].count) == 0:
                raise LoraclError(f"inflora: no input reached adapted layer {key} during the statistics pass; "
                                  f"restrict method.encoders / method.blocks to layers the task's data goes through")
            out[key] = C.double().cpu()
        return out

    def text_pass(self, task) -> None:
        """CLIP text-encoder layers see the prompts of the task's classes (their only task data)."""
        if not any(s.encoder == "text" for s in self.model.adapter.sites):
            return
        head = self.model.head
        if not hasattr(head, "encode_batched"):
            raise LoraclError("inflora: LoRA on the text encoder needs head.kind 'text' (prompts are its inputs)")
        with torch.autocast(self.model.device.type, enabled=False):
            head.encode_batched(list(task.class_ids))

    def log_memory(self, task) -> None:
        dims = self.memory.dims()
        if not dims:
            return
        d = sorted({layer.d_in for layer in self.layers.values()})
        n = sorted(v[0] for v in dims.values())
        retain = sum(1 for v in dims.values() if v[1] == "retain")
        self.run.log(f"  inflora memory after task {task.index}: threshold {self.memory.threshold(task.index):.4f}, "
                     f"old-space dims per layer min {n[0]} / median {n[len(n) // 2]} / max {n[-1]} "
                     f"of {'/'.join(map(str, d))}"
                     f"{f', {retain} layers stored as retain' if retain else ''}")
