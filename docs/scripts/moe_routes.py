"""Routing analysis of a finished moe-adapters run: per dataset, where DDAS sends its test images, and the
accuracy of zero-shot CLIP, of the method (DDAS), and of the dataset's own router forced (oracle task id)."""
import torch

from finished_run import finished_runner

run = finished_runner(copy=True)
m, model = run.method, run.model
tasks = run.scenario.tasks
print("threshold", m.cfg.threshold)
with torch.no_grad():
    for t in tasks:
        ids = torch.as_tensor(t.class_ids)
        xs, ys = zip(*run.data.eval_batches(t.test))
        x, y = torch.cat(xs), torch.cat(ys)
        cols = run.data.classes.columns(y, ids) if hasattr(run.data, "classes") else None
        target = torch.tensor([t.class_ids.index(int(v)) for v in y]) if cols is None else cols
        f = m.zero_shot_features(x)
        err = m.bank.errors(f)
        best, slot = err.min(1)
        route = m.select(f)
        with model.adapter.inactive():
            zs = model.head(model.features(x), ids)
        dd = m.logits(x, ids)
        for mm in m.mixtures:
            mm.set_route(t.index)
        own = model(x, ids)
        acc = lambda z: 100 * float((z.argmax(1).cpu() == target).float().mean())
        counts = torch.bincount(slot, minlength=len(tasks) + 1).tolist()
        print(f"{t.name:12s} n={len(y)} best-slot counts (0=reference) {counts} -> zero-shot share "
              f"{100 * float((route < 0).float().mean()):.1f}%, own-router share {100 * float((route == t.index).float().mean()):.1f}%; "
              f"mean err per slot {[round(float(e[torch.isfinite(e)].mean()), 4) if torch.isfinite(e).any() else None for e in err.T]}; "
              f"acc zero-shot {acc(zs):.2f} ddas {acc(dd):.2f} own-router {acc(own):.2f}")
