"""Statistics the continual-learning methods share, accumulated exactly and summed over processes.

- token-level input second moments of adapted layers (InfLoRA, KeepLoRA), in fp32 over every token: `sum x x^T`
  and the token count are accumulated separately and divided once at the end, so the result is the covariance
  of the whole data set whatever the batch size; across processes the sums are added before the division;
- per-class feature means and covariances (classifier alignment's Gaussians, NCM's prototypes) and the cosine
  scoring of features against prototypes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .. import dist
from ..models.lora import LoRALayer


class SecondMoment:
    """Uncentred second moment C = (1/N) sum over tokens x x^T of d-dimensional inputs."""

    def __init__(self, d: int, device=None, dtype: torch.dtype = torch.float32):
        self.sum = torch.zeros(d, d, device=device, dtype=dtype)
        self.count = torch.zeros((), device=device, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sum.dtype)
        self.sum.addmm_(x.t(), x)
        self.count += x.shape[0]

    def finalize(self) -> torch.Tensor:
        dist.all_reduce_sum_(self.sum)
        dist.all_reduce_sum_(self.count)
        return self.sum / self.count.clamp(min=1).to(self.sum.dtype)


@contextlib.contextmanager
def tapped(layers: list[LoRALayer], tap_of):
    """Within the block, every layer of `layers` calls `tap_of(layer)` with its input on every forward."""
    handles = [(layer, layer.add_tap(tap_of(layer))) for layer in layers]
    try:
        yield
    finally:
        for layer, h in handles:
            layer.remove_tap(h)


@contextlib.contextmanager
def layer_input_moments(layers: list[LoRALayer], dtype: torch.dtype = torch.float32):
    """Within the block, every forward through `layers` adds its inputs to a per-layer SecondMoment."""
    accs = {layer: SecondMoment(layer.d_in, device=layer.weight.device, dtype=dtype) for layer in layers}
    with tapped(layers, lambda layer: accs[layer].update):
        yield accs


class _Reached(Exception):
    """Raised by a tap of `forward_until` once every tapped layer has seen its input."""


@contextlib.contextmanager
def forward_until(layers: list[LoRALayer]):
    """Within the block, `run(forward)` calls forward() and ends it as soon as every layer of `layers` has seen
    its input in that call: a statistics pass needs nothing that later layers compute (InfLoRA-b5 adapts the
    first 5 of 12 blocks). Enter it after the statistics taps, so that they see the last input first. A
    forward that does not reach every layer (a text-encoder layer in an image pass) runs whole."""
    left: set[int] = set()

    def make_tap(layer):
        def tap(_x):
            left.discard(id(layer))
            if not left:
                raise _Reached
        return tap

    def run(forward) -> None:
        left.update(id(layer) for layer in layers)
        try:
            forward()
        except _Reached:
            pass

    with tapped(layers, make_tap):
        yield run


class ClassStatistics:
    """Per-class feature sums, second moments and counts (float64), summed over processes -> class means and
    covariances. Classifier alignment stores the Gaussians (SLCA), NCM the means (SimpleCIL)."""

    def __init__(self, ids, dim: int, device=None, covariance: bool = True):
        self.ids = torch.as_tensor(list(ids), dtype=torch.long, device=device)
        n = len(self.ids)
        self.sum = torch.zeros(n, dim, device=device, dtype=torch.float64)
        self.outer = torch.zeros(n, dim, dim, device=device, dtype=torch.float64) if covariance else None
        self.count = torch.zeros(n, device=device, dtype=torch.float64)

    @torch.no_grad()
    def update(self, feats: torch.Tensor, y: torch.Tensor) -> None:
        x = feats.detach().reshape(len(y), -1).to(self.sum)
        k = (y.to(self.ids.device).unsqueeze(1) == self.ids).long().argmax(1)  # row of each target's class
        self.sum.index_add_(0, k, x)
        self.count.index_add_(0, k, torch.ones_like(k, dtype=torch.float64))
        if self.outer is not None:
            # one d x d product per class present: a batch-wide outer product tensor would be B x d x d
            for c in torch.unique(k).tolist():
                xc = x[k == c]
                self.outer[c].addmm_(xc.t(), xc)

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(means C x d, covariances C x d x d with torch.cov's N - 1 normalisation, or None); `count` then
        holds every process's images."""
        dist.all_reduce_sum_(self.sum)
        dist.all_reduce_sum_(self.count)
        n = self.count.clamp(min=1).unsqueeze(1)
        self.means, self.covs = self.sum / n, None
        if self.outer is not None:
            dist.all_reduce_sum_(self.outer)
            centred = self.outer - n.unsqueeze(2) * self.means.unsqueeze(2) * self.means.unsqueeze(1)
            self.covs = centred / (n - 1).clamp(min=1).unsqueeze(2)
        return self.means, self.covs


def class_feature_statistics(run, model, images, class_ids, desc: str, covariance: bool = True) -> ClassStatistics:
    """Per-class statistics of `model.features` over one image set or a list of them (test transforms, eval
    mode, autocast off), finalized: `.means`, `.covs` (or None), `.count`."""
    acc = ClassStatistics(class_ids, model.backbone.feature_dim, device=model.device, covariance=covariance)
    was_training = model.training
    model.eval()

    def fn(b):
        with torch.autocast(model.device.type, enabled=False):
            acc.update(model.features(b.x), b.y)

    for imgs in images if isinstance(images, list) else [images]:
        run.forward_pass(imgs, fn, desc=desc, view="test")
    model.train(was_training)
    acc.finalize()
    return acc


def ncm_logits(feats: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every feature (rows) with every class prototype (columns): nearest class mean."""
    return F.normalize(feats.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).t()
