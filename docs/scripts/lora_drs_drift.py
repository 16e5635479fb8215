"""Diagnostic on a finished lora-drs run: drift of the stored prototypes (cosine to class means recomputed with the
final backbone) and NCM accuracy with stored vs recomputed prototypes; sizes of the method's stored state."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from loracl.cl.statistics import class_feature_statistics
from finished_run import finished_runner

torch.set_num_threads(1)
d = Path(sys.argv[1])
r = finished_runner(d)
m, model = r.method, r.model
state = m.state_dict()
nbytes = {k: sum(t.numel() * t.element_size() for t in (v if isinstance(v, list) else [v])) for k, v in state.items()}
print("stored state bytes", nbytes, "total", sum(nbytes.values()))
new = torch.cat([class_feature_statistics(m.run, model, t.train, t.class_ids, "recompute", covariance=False)
                 .means.double().cpu() for t in r.scenario.tasks])
cos = F.cosine_similarity(m.means, new, dim=1)
print("prototype cosine stored vs final-backbone, per task:", [round(float(c), 4) for c in cos.view(10, -1).mean(1)])
protos = {"stored": F.normalize(m.means.float(), dim=1), "recomputed": F.normalize(new.float(), dim=1)}
correct = {k: [0] * len(r.scenario) for k in protos}
total = [0] * len(r.scenario)
ids = m.ids
for j, t in enumerate(r.scenario.tasks):
    def fn(b, j=j):
        with torch.no_grad():
            f = F.normalize(model.features(b.x).float(), dim=1)
        for k, P in protos.items():
            pred = ids[(f @ P.t()).argmax(1)]
            correct[k][j] += int((pred == b.y.cpu()).sum())
        total[j] += len(b.y)
    m.run.forward_pass(t.test, fn, desc="eval-diag", view="test")
for k in protos:
    accs = [100 * c / n for c, n in zip(correct[k], total)]
    print(k, "final acc %.2f" % (sum(accs) / len(accs)), [round(a, 1) for a in accs])
