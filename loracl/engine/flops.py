"""Training FLOPs counted on real steps with PyTorch's FLOP counter (forward + backward).

The first step of every training phase or data pass runs under `FlopCounterMode`, and so does the first
step of every other batch size in it (an epoch's short last batch); later steps reuse the count of their
(phase, batch size), so the meter costs one or two instrumented steps per phase and stays exact for steps
whose cost is not proportional to the batch (A-GEM's reference gradient on a fixed memory sample).
Matrix multiplications, convolutions and attention are counted; element-wise work is not, which is the
usual convention for training FLOPs.
"""

from __future__ import annotations

from collections import defaultdict

from torch.utils.flop_counter import FlopCounterMode

from .. import dist


class FlopMeter:
    def __init__(self):
        self.by_phase: dict[str, float] = defaultdict(float)
        self.per_sample: dict[str, float] = {}

    def step(self, phase: str, batch_size: int, fn, replicated: bool = False):
        """Run `fn()` (one step of `phase` on `batch_size` samples), counting its FLOPs; returns fn's result.
        The step is this process's share of a global batch (counted once per process) unless `replicated`."""
        key = f"{phase}|{batch_size}"
        if key not in self.per_sample:
            with FlopCounterMode(display=False) as fc:
                out = fn()
            self.per_sample[key] = fc.get_total_flops() / max(batch_size, 1)
        else:
            out = fn()
        self.by_phase[phase] += self.per_sample[key] * batch_size * (1 if replicated else dist.world_size())
        return out

    def new_phase(self, phase: str) -> None:
        """Forget the counts of `phase` (the model changed shape, e.g. a branch was added)."""
        for key in [k for k in self.per_sample if k.rsplit("|", 1)[0] == phase]:
            del self.per_sample[key]

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
