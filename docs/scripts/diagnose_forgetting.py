"""Diagnose forgetting of a finished run from its task checkpoints: per task, class-incremental accuracy
(argmax over all seen classes), task-aware accuracy (argmax within the task's own classes), and the drift of
its test features relative to the model right after it was learned (mean cosine similarity).

    PYTHONPATH=. python docs/scripts/diagnose_forgetting.py runs/cifar100-mini/inflora/seed0

Prints one block per checkpoint and writes diagnosis.json into the run folder (docs/inflora.md).
"""
import json
import sys
from pathlib import Path
import torch
from loracl.runs.statefile import load
from loracl.runs.assembly import load_config
from loracl.runs.runner import Runner

run_dir = Path(sys.argv[1])
torch.set_num_threads(1)
cfg = load_config(run_dir / "config.yaml", sets=["eval.retention=null"])
r = Runner(cfg, "/tmp/diag-unused", progress=False, log=lambda *a, **k: None)
r.method.setup()
T = len(r.scenario)
cks = sorted((run_dir / "checkpoints").glob("task_*.pt"))
joint = r.caps.joint
ref_feats = {}
out = {"task_aware": [], "class_inc": [], "feature_cos": []}
for ck in cks:
    j = int(ck.stem.split("_")[1])
    r.checkpoints.load_model_state(load(ck))
    r.model.eval()
    seen = r.data.classes.tensor(r.scenario.seen_classes(j))
    ta, ci, cs = [], [], []
    for i in range(j + 1):
        task = r.scenario.tasks[i]
        own = r.data.classes.tensor(task.class_ids)
        feats, ys = [], []
        with torch.no_grad():
            for x, y in r.data.eval_batches(task.test):
                feats.append(r.model.features(x)); ys.append(y)
        f, y = torch.cat(feats), torch.cat(ys)
        with torch.no_grad():
            la, lc = r.model.head(f, own), r.model.head(f, seen)
        ta.append(round(100 * (own[la.argmax(1)] == y).float().mean().item(), 1))
        ci.append(round(100 * (seen[lc.argmax(1)] == y).float().mean().item(), 1))
        if i == j or joint:
            ref_feats[i] = f
        cs.append(round(torch.nn.functional.cosine_similarity(f, ref_feats[i]).mean().item(), 4))
    out["task_aware"].append(ta); out["class_inc"].append(ci); out["feature_cos"].append(cs)
    print(f"after task {j}: task-aware {ta}\n              class-inc  {ci}\n              feat-cos   {cs}", flush=True)
last_ta = out["task_aware"][-1]
print(f"final: task-aware mean {sum(last_ta) / len(last_ta):.2f}, class-inc mean "
      f"{sum(out['class_inc'][-1]) / len(out['class_inc'][-1]):.2f}")
(run_dir / "diagnosis.json").write_text(json.dumps(out))
