"""Final-row accuracy of a finished lae run: ensemble (the method), online adapters alone, offline (EMA) alone,
and the head on the backbone without adapters."""
import sys

import torch

from loracl.cl.ema import lent
from loracl.runs.assembly import load_config
from loracl.runs.runner import Runner

cfg = load_config(sys.argv[1] + "/config.yaml")
cfg.eval.retention = None
r = Runner(cfg, sys.argv[1], resume=True, progress=False, log=lambda *a, **k: None)
assert r.prepare()[0] == len(r.scenario)
r.model.eval()
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
        print(f"{name:12s} final {sum(row) / len(row):.2f}  task-aware {sum(aware) / len(aware):.2f}  "
              f"per task {[round(v, 1) for v in row]}", flush=True)
