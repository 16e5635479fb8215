"""The Runner of a finished run with its scenario's real images, for the diagnostic scripts beside this file:
its method set up and restored from the last task's checkpoint, the model in eval mode.

`copy=True` works on a temporary copy of the run folder (the scripts that retrain a part of the method, so the
run itself is never written). Unlike `loracl.runs.export.restore_run`, which rebuilds the scenario from
results.json without images, the data sets are loaded as the run's config says."""
import shutil
import sys
import tempfile
from pathlib import Path

from loracl.runs.assembly import load_config
from loracl.runs.runner import Runner


def finished_runner(run_dir=None, copy: bool = False) -> Runner:
    run_dir = Path(run_dir or sys.argv[1])
    if copy:
        tmp = Path(tempfile.mkdtemp()) / "run"
        shutil.copytree(run_dir, tmp)
        run_dir = tmp
    cfg = load_config(run_dir / "config.yaml")
    cfg.eval.retention = None
    runner = Runner(cfg, run_dir, resume=True, progress=False, log=lambda *a, **k: None)
    start, _ = runner.prepare()
    if start != len(runner.scenario):
        raise SystemExit(f"{run_dir}: the run is not finished (its checkpoints end before task {len(runner.scenario)})")
    runner.model.eval()
    return runner
