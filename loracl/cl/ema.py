"""An exponential moving average of tensors, kept beside the ones it follows (LAE's offline adapters; timm's
ModelEmaV2 update rule):

    avg <- decay * avg + (1 - decay) * current          once per optimiser step

and a context that lends the averaged values to the live parameters for one computation (an evaluation with
the offline copy), without copying the model.
"""

from __future__ import annotations

import contextlib

import torch


@torch.no_grad()
def ema_update_(avg: list[torch.Tensor], current: list[torch.Tensor], decay: float) -> None:
    """avg <- decay * avg + (1 - decay) * current, in place, tensor by tensor (fp32 math on fp32 copies)."""
    for a, c in zip(avg, current, strict=True):
        a.mul_(decay).add_(c.detach().to(a.dtype), alpha=1.0 - decay)


@contextlib.contextmanager
def lent(params: list[torch.nn.Parameter], values: list[torch.Tensor]):
    """Within the block the parameters hold `values` (their storage swapped, nothing copied); restored after."""
    own = [p.data for p in params]
    try:
        for p, v in zip(params, values, strict=True):
            p.data = v.to(p.device, p.dtype)
        yield
    finally:
        for p, o in zip(params, own):
            p.data = o
