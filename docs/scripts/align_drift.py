"""Drift of classifier alignment's stored statistics in a finished `align.enabled` run: per task, the mean cosine
between the class means stored when the class was learned and the class means of the final backbone (training
images, test transforms). Low values for old tasks: the head is aligned on Gaussians its features left."""

import torch
import torch.nn.functional as F

from finished_run import finished_runner
from loracl.cl.statistics import class_feature_statistics

torch.set_num_threads(1)
r = finished_runner()
stored = r.aligner
for t in r.scenario.tasks:
    now = class_feature_statistics(r.services, r.model, t.train, t.class_ids, "drift", covariance=False)
    rows = [int((stored.ids == c).nonzero()[0]) for c in t.class_ids]
    cos = F.cosine_similarity(stored.means[rows].float(), now.means.float().cpu(), dim=-1)
    print(f"task {t.index}: cosine(stored, final) {float(cos.mean()):.3f}", flush=True)
