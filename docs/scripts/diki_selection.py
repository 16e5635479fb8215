"""What DIKI's selection does on each dataset's test images, after each task of a run.

    python docs/scripts/diki_selection.py runs/mini-mtil-clip-16/diki/seed0

Per checkpoint and dataset: which learned task's Gaussian each image picks (fractions), the mean weight
w = sigmoid(log p / divisor - 1), the mean best log-likelihood, and the accuracy with the selected prompt at
that weight, at w = 1 (the prompt fully on, as in training) and at w = 0 (zero-shot). Trains nothing.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from loracl.methods.diki import log_likelihoods
from loracl.runs.assembly import load_config
from loracl.runs.runner import Runner
from loracl.runs.statefile import load as load_checkpoint


@torch.no_grad()
def main(run_dir: str) -> None:
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml", sets=["eval.retention=null"])
    if cfg.method_name != "diki":
        sys.exit(f"{run_dir} is a '{cfg.method_name}' run; this script reads diki runs")
    with tempfile.TemporaryDirectory() as tmp:
        run = Runner(cfg, Path(tmp), progress=False, log=lambda *a, **k: None)
        m = run.method
        m.setup()
        run.model.eval()
        tasks = run.scenario.tasks
        for ck in sorted((run_dir / "checkpoints").glob("task_*.pt")):
            t = int(ck.stem.split("_")[1])
            run.checkpoints.load_model_state(load_checkpoint(ck))
            p = m.prompts
            print(f"after task {t} ({tasks[t].name}):")
            for d, task in enumerate(tasks):
                ids = torch.tensor(task.class_ids)
                picks, ws, lps, right = torch.zeros(t + 1), [], [], {"sel": 0, "w1": 0, "w0": 0}
                n = 0
                for x, y, _ in run.data.batches(task.test, train=False):
                    logp = log_likelihoods(m.frozen_features(x), p.means[:t + 1], p.covs[:t + 1])
                    top, best = logp.max(1)
                    picks += torch.bincount(best, minlength=t + 1).float()
                    lps.append(top)
                    k, w = m.select(x)
                    ws.append(w)
                    cols = run.scenario.classes.columns(y, ids) if hasattr(run.scenario, "classes") else None
                    target = cols if cols is not None else torch.searchsorted(ids, y)
                    for key, weight in (("sel", w), ("w1", None), ("w0", torch.zeros(len(x)))):
                        right[key] += int((m.forward(x, ids, k, weight).argmax(1) == target).sum())
                    n += len(x)
                frac = " ".join(f"{float(v) / n:.2f}" for v in picks)
                print(f"  {task.name:12s} picks [{frac}]  mean w {float(torch.cat(ws).mean()):.3f}  "
                      f"mean best log p {float(torch.cat(lps).mean()):.1f}  acc selected {100 * right['sel'] / n:.2f}"
                      f"  w=1 {100 * right['w1'] / n:.2f}  w=0 {100 * right['w0'] / n:.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
