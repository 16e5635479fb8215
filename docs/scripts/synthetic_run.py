"""A full `loracl run` of a preset on random images of the preset's shape, for timing when the data is absent
(the issue's "10-task ImageNet-R-sized InfLoRA run end to end": 24,000 training images of 224 px, 50 epochs).

    python docs/scripts/synthetic_run.py --preset inflora-imagenet-r-10 --train-per-task 2400 --test-per-task 600 \
        --classes-per-task 20 --size 224 --out /tmp/imr10-synthetic --set backbone.pretrained=false

Accuracies are meaningless (random images, random labels); the run's results.json holds the times
(`cost.train_seconds_per_task`, `phase_seconds_per_task`, `peak_memory_bytes`), and the wall time is printed.
"""

from __future__ import annotations

import argparse
import time

from loracl.runs.assembly import load_config
from loracl.data.synthetic import synthetic_scenario
from loracl.runs.runner import Runner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True)
    p.add_argument("--method")
    p.add_argument("--out", required=True)
    p.add_argument("--train-per-task", type=int, required=True)
    p.add_argument("--test-per-task", type=int, required=True)
    p.add_argument("--classes-per-task", type=int, required=True)
    p.add_argument("--size", type=int, required=True, help="side of the random images (px)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    cfg = load_config(preset=a.preset, method=a.method, sets=a.set + ["eval.retention=null"])
    tasks = cfg.benchmark.num_tasks or len(cfg.benchmark.task_sizes or [])
    scenario = synthetic_scenario(tasks, a.classes_per_task, a.train_per_task, a.test_per_task, a.size)
    t0 = time.perf_counter()
    res = Runner(cfg, a.out, progress=True, scenario=scenario).run()
    print(f"{tasks} tasks x {a.train_per_task} training images at {a.size} px, "
          f"{cfg.epochs_for(0)} epochs per task: {time.perf_counter() - t0:.1f} s end to end "
          f"(training {sum(res['cost']['train_seconds_per_task']):.1f} s, peak memory "
          f"{res['cost']['peak_memory_bytes'] / 2**30:.2f} GiB, {res['cost']['peak_memory_kind']})")


if __name__ == "__main__":
    main()
