"""Prompts for a frozen ViT or CLIP image encoder, put into its own attention modules (prefix tuning).

A prompt of length L for one block is split into L/2 key tokens and L/2 value tokens (per sample,
B x L/2 x C each) that are prepended to that block's attention keys and values; the queries and the token
sequence stay as they are, so every block returns as many tokens as before. This is how CODA-Prompt's code
(which InfLoRA's repository re-uses for L2P, DualPrompt and CODA-Prompt) conditions the ViT. The attention
modules are patched in place (`models/attention.py`, where LoRA on CLIP's attention lives too), not copied.

A prompt method's module subclasses `PromptModule`: it draws the query (the frozen pretrained model's
features, no prompts, no LoRA, no gradient), builds the per-block prefixes from it and runs the backbone
with them set (`prefixed` always clears them). The math the methods share is here once: `split_prefix`,
`cosine_topk`, `gram_schmidt`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist
from ..errors import ConfigError
from .attention import Prefix, prefix_slots, prefixed
from .lora import LoRALayer


@contextlib.contextmanager
def lora_inactive(module: nn.Module):
    """The module computed without its LoRA branches (the query is drawn from the pretrained model)."""
    layers = [m for m in module.modules() if isinstance(m, LoRALayer)]
    old = [layer.active for layer in layers]
    for layer in layers:
        layer.active = False
    try:
        yield
    finally:
        for layer, a in zip(layers, old):
            layer.active = a


def prompt_tuned_features(backbone, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Prompt tuning (L2P's paper) instead of prefix tuning: `tokens` (B x P x C) are prepended to the sequence
    entering the first block (after the position embedding) by a pre-hook, and the feature is the mean of their
    outputs after the final norm (the paper's classifier input), through the model's own fc_norm."""
    if backbone.family != "timm":
        raise ConfigError("prompt tuning is implemented for timm ViTs only; use prefix tuning on CLIP")
    m = backbone.model
    hook = m.blocks[0].register_forward_pre_hook(
        lambda mod, args: (torch.cat([tokens.to(args[0].dtype), args[0]], 1),) + tuple(args[1:]))
    try:
        out = m.forward_features(x)
    finally:
        hook.remove()
    return m.head_drop(m.fc_norm(out[:, : tokens.shape[1]].mean(1)))


# ---- the math the methods share ------------------------------------------------------------------------

def split_prefix(p: torch.Tensor) -> Prefix:
    """A prompt (..., L, C) -> its first L/2 tokens as keys and its last L/2 as values, each (B, -1, C): the
    leading dimensions after the batch (several selected prompts) are concatenated along the tokens."""
    L = p.shape[-2]
    if L % 2:
        raise ValueError(f"a prefix prompt needs an even length, got {L}")
    B, C = p.shape[0], p.shape[-1]
    return Prefix(p[..., : L // 2, :].reshape(B, -1, C), p[..., L // 2:, :].reshape(B, -1, C))


def cosine_topk(q: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine of every query with every key (B x n) and the indices of the k most similar keys (B x k)."""
    cos = F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).t()
    return cos, cos.topk(k, dim=-1).indices


@torch.no_grad()
def gram_schmidt(new: torch.Tensor, old: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Rows of `new` (n x d) made orthonormal to each other and to the span of the rows of `old` (m x d),
    in order. A row with no free direction left (m + n > d) stays a unit vector in its own direction."""
    dt = new.dtype
    basis = []
    if old is not None and len(old):
        U, S, _ = torch.linalg.svd(old.double().t(), full_matrices=False)
        basis = list(U[:, S > eps * S[0]].t())
    out = []
    for v in new.double():
        u = v.clone()
        for _ in range(2):  # twice: classical Gram-Schmidt loses orthogonality in one pass
            for b in basis:
                u = u - (u @ b) * b
        if u.norm() <= eps * v.norm():
            out.append(v / v.norm())
            continue
        u = u / u.norm()
        basis.append(u)
        out.append(u)
    return torch.stack(out).to(dt)


def batch_total(qn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum of the rows of qn (no gradient) and their number over the whole batch: under torchrun a
    batch-summed loss must see every process's share, as a single process sees the batch."""
    s = torch.cat([qn.detach().sum(0), qn.new_full((1,), len(qn))])
    dist.all_reduce_sum_(s)
    return s[:-1], s[-1]


def uniform_(*shape: int) -> nn.Parameter:
    """Prompts and keys start uniform in [0, 1) as in CODA-Prompt's code (`tensor_prompt`)."""
    return nn.Parameter(torch.rand(*shape))


class QueryMemo:
    """Queries of test-view images, keyed by content: each image's key is its projection on 4 fixed random
    directions (float64, computed where the image is), so a lookup moves 32 bytes per image, not the image.
    Distinct real images do not share all four projections; an identical image has the same query anyway. A key
    that rounds differently (another thread split of the sums) only misses: the query is then computed.
    Holds at most `mb` MiB of queries; past that, new images are computed and not kept."""

    def __init__(self, mb: float):
        self.budget, self.used = mb * 2 ** 20, 0
        self.rows: dict[bytes, torch.Tensor] = {}
        self._dirs: torch.Tensor | None = None

    def keys_of(self, x: torch.Tensor) -> list[bytes]:
        flat = x.reshape(len(x), -1)
        if self._dirs is None or self._dirs.shape[0] != flat.shape[1] or self._dirs.device != x.device:
            g = torch.Generator().manual_seed(0)
            self._dirs = torch.randn(flat.shape[1], 4, generator=g, dtype=torch.float64).to(x.device)
        flat = flat.double()  # per-row sums, not a matmul, whose rounding would depend on the batch's layout
        proj = torch.stack([(flat * d).sum(1) for d in self._dirs.t()], 1).cpu().numpy()
        shape = str(tuple(x.shape[1:])).encode()
        return [r.tobytes() + shape for r in proj]

    def get(self, keys: list[bytes]) -> torch.Tensor | None:
        """The batch's queries if every image's is held, else None."""
        found = [self.rows.get(k) for k in keys]
        return None if any(f is None for f in found) else torch.stack(found)

    def put(self, keys: list[bytes], q: torch.Tensor) -> None:
        for k, row in zip(keys, q):
            if k not in self.rows and self.used + row.numel() * row.element_size() <= self.budget:
                self.rows[k] = row.clone()
                self.used += row.numel() * row.element_size()


# ---- a method's prompt module ------------------------------------------------------------------------------

class PromptModule(nn.Module):
    """Owned by the model as 'prompts' (in the optimiser group "prompts"): `ContinualModel.features(x)` calls
    `features(backbone, x)`.

    `task` is the latest task begun (-1 before the first: the backbone runs without prompts, so the
    untrained model is the pretrained one), kept in the state dict; `learning` is True while the method trains
    on `task`.
    `aux_loss` holds the last forward's auxiliary loss (key matching), computed inside that forward so
    that DDP sees it; the method's `loss` adds it.
    """

    def __init__(self, blocks: list[int], memo_mb: float = 256):
        super().__init__()
        self.blocks = sorted(blocks)
        self.memo = QueryMemo(memo_mb)
        # the task, on the host for every forward and as a buffer in checkpoints (a restored model prompts as saved)
        self.task = -1
        self.register_buffer("task_index", torch.tensor(-1))
        self.learning = False
        self.aux_loss: torch.Tensor | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.task = int(self.task_index)

    def begin(self, task: int) -> None:
        self.task = task
        self.task_index.fill_(task)
        self.learning = True

    def end(self) -> None:
        self.learning = False

    def prefixes(self, q: torch.Tensor) -> tuple[dict[int, Prefix], torch.Tensor | None]:
        """Per-block prefixes for queries q (B x d) and the auxiliary loss (or None)."""
        raise NotImplementedError

    group = "prompts"

    def trainable(self) -> list[nn.Parameter]:
        """The parameters the current task trains (none outside a task's training)."""
        raise NotImplementedError

    def query(self, backbone, x: torch.Tensor) -> torch.Tensor:
        """q(x): the frozen pretrained model's features (final-norm CLS; CLIP: image embedding).

        q is a pure function of x when the backbone is in eval mode, so outside training (no autograd, eval
        mode: evaluation, retention, NCM) it is memoised per image, keyed by the image's content (`_memo`):
        the test views of a task's images are the same at every evaluation, and each later evaluation then
        runs the backbone once per batch instead of twice. Training batches are augmented and never memoised."""
        memo = None if torch.is_grad_enabled() or backbone.training else self.memo
        if memo is not None:
            keys = memo.keys_of(x)
            q = memo.get(keys)
            if q is not None:
                return q
        with torch.no_grad(), lora_inactive(backbone):
            q = backbone.features(x).float()
        if memo is not None:
            memo.put(keys, q)
        return q

    def features(self, backbone, x: torch.Tensor) -> torch.Tensor:
        self.aux_loss = None
        if self.task < 0:
            return backbone.features(x)
        slots = prefix_slots(backbone, self.blocks)
        prefixes, self.aux_loss = self.prefixes(self.query(backbone, x))
        with prefixed(slots, prefixes):
            return backbone.features(x)
