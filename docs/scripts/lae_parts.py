"""Final-row accuracy of a finished lae run: ensemble (the method), online adapters alone, offline (EMA) alone,
and the head on the backbone without adapters."""

import torch

from finished_run import finished_runner
from loracl.cl.ema import lent

r = finished_runner()
m = r.method
T = len(r.scenario) - 1


def online(x, ids):
    return m.model(x, ids)


def offline(x, ids):
    with lent(m.adapters(), m.offline):
        return m.model(x, ids)


def bare(x, ids):
    with m.model.adapter.inactive():
        return m.model(x, ids)


on, off = torch.cat([p.detach().flatten() for p in m.adapters()]), torch.cat([t.flatten() for t in m.offline])
print(f"||offline - online|| / ||online|| = {float((off - on).norm() / on.norm()):.3f}; "
      f"||online|| {float(on.norm()):.3f} ||offline|| {float(off.norm()):.3f}")
with torch.no_grad():
    for name, fn in (("ensemble", m.logits), ("online", online), ("offline", offline), ("no adapters", bare)):
        row, aware = r.evaluator.evaluate_row(T, fn)
        aware = f"  task-aware {sum(aware) / len(aware):.2f}" if aware else ""  # none in domain-incremental runs
        print(f"{name:12s} final {sum(row) / len(row):.2f}{aware}  per task {[round(v, 1) for v in row]}",
              flush=True)
