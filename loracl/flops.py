"""Training FLOPs counted on real steps with PyTorch's FLOP counter (forward + backward).

The first step of every training phase or data pass runs under `FlopCounterMode`; later steps of the
same phase add that count scaled by their batch size, so the meter costs one instrumented step per
phase. Matrix multiplications, convolutions and attention are counted; element-wise work is not,
which is the usual convention for training FLOPs.
"""

from __future__ import annotations

from collections import defaultdict

from torch.utils.flop_counter import FlopCounterMode

from . import dist


class FlopMeter:
    def __init__(self):
        self.by_phase: dict[str, float] = defaultdict(float)
        self.per_sample: dict[str, float] = {}

    def step(self, phase: str, batch_size: int, fn):
        """Run `fn()` (one step of `phase` on `batch_size` samples), counting its FLOPs; returns fn's result."""
        if phase not in self.per_sample:
            with FlopCounterMode(display=False) as fc:
                out = fn()
            self.per_sample[phase] = fc.get_total_flops() / max(batch_size, 1)
        else:
            out = fn()
        self.by_phase[phase] += self.per_sample[phase] * batch_size * dist.world_size()
        return out

    def new_phase(self, phase: str) -> None:
        """Forget the per-sample count of `phase` (the model changed shape, e.g. a branch was added)."""
        self.per_sample.pop(phase, None)

    @property
    def total(self) -> float:
        return float(sum(self.by_phase.values()))

    def reset(self) -> None:
        self.by_phase.clear()
        self.per_sample.clear()

    def state_dict(self) -> dict:
        return {"by_phase": dict(self.by_phase), "per_sample": dict(self.per_sample)}

    def load_state_dict(self, s: dict) -> None:
        self.by_phase = defaultdict(float, s["by_phase"])
        self.per_sample = dict(s["per_sample"])
