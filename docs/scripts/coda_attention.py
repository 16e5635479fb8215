"""Which tasks' components CODA-Prompt uses for each dataset's test images, at each task checkpoint of a run.

    python docs/scripts/coda_attention.py runs/mini-mtil/coda-prompt/seed0

For every dataset seen so far and every checkpoint: the mean absolute attention weight |alpha| of each task's
components (averaged over the images, the task's components and the prompted blocks), and the cosine between
the datasets' mean queries. Reads the run's config and checkpoints; trains nothing.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from loracl.runs.statefile import load as load_checkpoint
from loracl.runs.assembly import load_config
from loracl.methods.coda_prompt import component_weights
from loracl.runs.runner import Runner


@torch.no_grad()
def main(run_dir: str, images: int = 200) -> None:
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml", sets=["eval.retention=null"])
    if cfg.method_name != "coda-prompt":
        sys.exit(f"{run_dir} is a '{cfg.method_name}' run; this script reads coda-prompt runs")
    with tempfile.TemporaryDirectory() as tmp:
        run = Runner(cfg, Path(tmp), progress=False, log=lambda *a, **k: None)
        run.method.setup()
        prompts, backbone = run.model.prompts, run.model.backbone
        tasks = run.scenario.tasks
        run.model.eval()
        queries = []
        for task in tasks:
            n = min(int(images), len(task.test))
            queries.append(torch.cat([prompts.query(backbone, x) for x, _, _ in
                                      run.data.batches(task.test.subset(range(n)), train=False)]))
        means = F.normalize(torch.stack([q.mean(0) for q in queries]), dim=1)
        names = [t.name for t in tasks]
        print("cosine between the datasets' mean queries:")
        for i, a in enumerate(names):
            print(f"  {a:14s}", " ".join(f"{float(means[i] @ means[j]):.3f}" for j in range(len(names))))
        for ck in sorted((run_dir / "checkpoints").glob("task_*.pt")):
            t = int(ck.stem.split("_")[1])
            run.checkpoints.load_model_state(load_checkpoint(ck))
            print(f"after task {t} ({names[t]}): mean |alpha| of each task's components")
            for d in range(t + 1):
                w = torch.zeros(t + 1)
                for c in prompts.components:
                    _, K, A = c.upto(t)
                    alpha = component_weights(queries[d], K, A).abs()
                    w += alpha.view(len(alpha), t + 1, -1).mean((0, 2)) / len(prompts.components)
                print(f"  {names[d]:14s}", " ".join(f"{float(v):.3f}" for v in w))


if __name__ == "__main__":
    main(*sys.argv[1:])
