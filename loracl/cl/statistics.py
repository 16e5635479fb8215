"""Statistics the continual-learning methods share, accumulated exactly and summed over processes.

- token-level input second moments of adapted layers (InfLoRA, KeepLoRA), in fp32 over every token: `sum x x^T`
  and the token count are accumulated separately and divided once at the end, so the result is the covariance
  of the whole data set whatever the batch size; across processes the sums are added before the division;
- per-class feature means and covariances (classifier alignment's Gaussians, NCM's prototypes) and the cosine
  scoring of features against prototypes;
- KeepLoRA's feature matrices: the MTIL code's running mean of per-batch token matrices (`BatchMeanFeatures`),
  and per-class means of normalised features (`ClassMeans`);
- per-class multi-centroid statistics (HiDe-Prompt's 'multi-centroid' storage): a seeded k-means of each class's
  features, and per cluster its mean and per-dimension variance.
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


def prototype_logits(features, class_ids: torch.Tensor, ids: torch.Tensor, prototypes: torch.Tensor,
                     rows_of) -> torch.Tensor | None:
    """`ncm_logits` of `features()` over `class_ids`, for a table of prototypes of the classes `ids`
    (`rows_of(some_ids, ids)` gives their rows). Classes without a prototype yet score -inf; None when none of
    `class_ids` has one (the features are then not computed: the caller's own head scores them)."""
    known = torch.isin(class_ids, ids)
    if not known.any():
        return None
    out = ncm_logits(features(), prototypes[rows_of(class_ids[known], ids)])
    if known.all():
        return out
    full = out.new_full((len(out), len(class_ids)), float("-inf"))
    full[:, known] = out
    return full


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 20) -> torch.Tensor:
    """Cluster labels (N) of the rows of x (N x d) by k-means: k-means++ seeding from the CPU `generator`, then
    `iters` Lloyd steps (a cluster left empty keeps its centre). k >= N gives every row its own cluster."""
    n = len(x)
    if k >= n:
        return torch.arange(n, device=x.device)
    x = x.double()
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(k - 1):  # each next centre drawn with probability proportional to the squared distance
        p = (d2 / d2.sum()).cpu() if d2.sum() > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
        i = int(torch.multinomial(p, 1, generator=generator))
        centres.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    c = torch.stack(centres)
    labels = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        counts = torch.bincount(labels, minlength=k).to(x)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def multi_centroid_statistics(feats: torch.Tensor, y: torch.Tensor, class_ids, n_centroids: int,
                              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HiDe-Prompt's per-class storage: the features of each class in `class_ids` clustered by `kmeans` into
    `n_centroids` and, per non-empty cluster, its mean and per-dimension variance (numpy's, 1/N), float64.
    Returns (means R x d, variances R x d, class id of each row R), classes in the order of `class_ids`."""
    means, variances, owner = [], [], []
    for c in class_ids:
        xc = feats[y == c].double()
        if not len(xc):
            continue
        labels = kmeans(xc, n_centroids, generator)
        for j in labels.unique().tolist():
            xj = xc[labels == j]
            means.append(xj.mean(0))
            variances.append(xj.var(0, unbiased=False))
            owner.append(int(c))
    d = feats.shape[-1]
    if not means:
        return feats.new_zeros(0, d, dtype=torch.float64), feats.new_zeros(0, d, dtype=torch.float64), \
            torch.zeros(0, dtype=torch.long)
    return torch.stack(means), torch.stack(variances), torch.tensor(owner, dtype=torch.long)


class BatchMeanFeatures:
    """The MTIL code's feature matrix: the running mean of per-batch token matrices X_b^T (d x m), i.e.
    sum_b X_b^T / N over batches of equal size m (a smaller last batch is dropped, as its drop_last loader
    does). Its energy is concentrated on the mean token at each position, so eps_f keeps fewer directions
    than on the full token matrix. Only F F^T (d x d) is needed: it has F's left singular vectors and
    squared singular values."""

    def __init__(self, d: int, device=None):
        self.d, self.device = d, device
        self.sum: torch.Tensor | None = None
        self.m = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.sum is None:
            self.sum, self.m = x.t().clone(), x.shape[0]
        elif x.shape[0] == self.m:
            self.sum += x.t()

    def gram(self) -> torch.Tensor:
        """F F^T. Under torchrun each process holds its contiguous share of every batch, i.e. a block of F's
        columns (F = [F_0 | F_1 | ...]), so F F^T = sum over processes of F_p F_p^T."""
        g = (self.sum @ self.sum.t() if self.sum is not None
             else torch.zeros(self.d, self.d, device=self.device))
        return dist.all_reduce_sum_(g)


class ClassMeans:
    """Per-class sums of the normalised features of a task's classes, summed over processes -> normalised means
    (KeepLoRA+'s cosine head rows); `classes` is the run's class registry."""

    def __init__(self, classes, class_ids, dim: int, device=None):
        self.classes = classes
        self.ids = classes.tensor(class_ids)
        self.sums = torch.zeros(len(self.ids), dim, device=device, dtype=torch.float64)
        self.counts = torch.zeros(len(self.ids), device=device, dtype=torch.float64)

    @torch.no_grad()
    def add(self, feats: torch.Tensor, y: torch.Tensor) -> None:
        k = self.classes.columns(y, self.ids)
        self.sums.index_add_(0, k, F.normalize(feats.float(), dim=-1).double())
        self.counts.index_add_(0, k, torch.ones_like(k, dtype=torch.float64))

    def rows(self) -> torch.Tensor:
        dist.all_reduce_sum_(self.sums)
        dist.all_reduce_sum_(self.counts)
        return F.normalize((self.sums / self.counts.clamp(min=1).unsqueeze(1)).float(), dim=-1)
