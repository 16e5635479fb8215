"""The `loracl` command: run, list, compare, report, export, predict, demo, sweep, data, bench."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from . import dist
from .errors import LoraclError
from .runs.lock import LOCK, run_lock  # noqa: F401  (LOCK: the lock file's name, for tools and tests)

DEMO_METHODS = ["seq-lora", "inflora", "inflora-ca", "joint"]  # linear-probe too with --methods


def default_out(cfg) -> Path:
    return Path("runs") / cfg.name / cfg.method_name / f"seed{cfg.seed}"


def _differing(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dumps."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b), key=str)
                for k in _differing(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def cmd_run(args) -> int:
    from .runs.assembly import load_config
    from .runs.runner import Runner

    if args.resume and args.out and (Path(args.out) / "config.yaml").exists() and not (args.config or args.preset):
        cfg = load_config(Path(args.out) / "config.yaml", sets=args.set or [])
    else:
        cfg = load_config(args.config, preset=args.preset, method=args.method, seed=args.seed, out=args.out,
                          sets=args.set or [])
    if args.out:  # the folder given, not the one named in a moved or copied run's config.yaml
        cfg.out = str(args.out)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    if args.resume and (out / "config.yaml").exists():
        saved = load_config(out / "config.yaml")
        skip = {"out", "published"}
        diff = _differing(saved.model_dump(exclude=skip), cfg.model_dump(exclude=skip))
        if diff:
            raise LoraclError(f"--resume: the config differs from the stopped run's {out / 'config.yaml'} in "
                              f"{', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}; resume with the same "
                              f"command (or: loracl run --resume --out {out})")
    if not args.resume and (out / "results.json").exists() and not args.overwrite:
        raise LoraclError(f"{out} already holds a run; add --resume to continue it or --overwrite to replace it")
    with run_lock(out):
        if args.overwrite and not args.resume and os.environ.get("RANK", "0") == "0":  # torchrun: one deletes
            import shutil

            for sub in ("checkpoints", "results.json", "report.html", "tensorboard"):
                p = out / sub
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        runner = Runner(cfg, out, resume=args.resume, progress=args.progress)
        results = runner.run()
    # under torchrun: every process leaves together once rank 0 has written the results (a process that
    # exits while its peers still hold the group open can abort in the group's teardown)
    main = dist.is_main()
    dist.finish()
    if main:
        m = results["metrics"]
        keys = [k for k in ("final_acc", "final_acc_task_avg", "avg_inc_acc", "forgetting", "transfer", "average",
                            "last", "pretrained_retention") if m.get(k) is not None]
        print("  ".join(f"{k} {m[k]:.2f}" for k in keys))
    return 0


def cmd_list(args) -> int:
    from .methods import list_methods
    from .runs.assembly import list_presets

    print("presets:")
    for name, desc in list_presets().items():
        print(f"  {name:28s} {desc}")
    print("methods:")
    for name, desc in list_methods().items():
        print(f"  {name:28s} {desc}")
    return 0


def cmd_compare(args) -> int:
    from .results.compare import compare

    text = compare([Path(d) for d in args.dirs], out=Path(args.out) if args.out else None, ref=args.ref)
    print(text)
    return 0


def cmd_report(args) -> int:
    from .results.report import write_report

    path = write_report(Path(args.dir))
    print(f"wrote {path}")
    return 0


def cmd_export(args) -> int:
    from .runs.export import export

    out = export(Path(args.dir), Path(args.out) if args.out else None)
    print(f"wrote {out} (model.json and the weights)")
    return 0


def cmd_predict(args) -> int:
    from .runs.export import predict, write_predictions

    rows = predict(Path(args.dir), args.paths, top_k=args.top_k, batch_size=args.batch_size, device=args.device,
                   workers=args.workers)
    write_predictions(rows, args.out, args.format)
    if args.out:
        print(f"wrote {len(rows)} predictions to {args.out}", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    """The embedded demo: several methods on the bundled benchmark, then the comparison table."""
    from .methods import list_methods
    from .results.compare import compare
    from .runs.assembly import load_config
    from .runs.runner import Runner

    known = list_methods()
    methods = [m for m in (args.methods or DEMO_METHODS) if m in known]
    root = Path(args.out)
    dirs = []
    for m in methods:
        cfg = load_config(preset="demo", method=m, seed=args.seed, sets=args.set or [])
        out = root / m / f"seed{args.seed}"
        if (out / "results.json").exists():
            import json

            if json.loads((out / "results.json").read_text()).get("status") == "complete" and not args.overwrite:
                print(f"{m}: already done in {out} (use --overwrite to redo)")
                dirs.append(out)
                continue
        with run_lock(out):
            Runner(cfg, out, resume=(out / "checkpoints").exists() and not args.overwrite,
                   progress=args.progress).run()
        dirs.append(out)
    print()
    print(compare(dirs, out=root / "comparison.md", first_columns=True))
    print("\nreports: " + ", ".join(str(d / "report.html") for d in dirs))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loracl", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run one continual-learning experiment",
                       description="Run one experiment from a preset (--preset NAME) or a config file.")
    r.add_argument("config", nargs="?", help="config YAML (instead of --preset)")
    r.add_argument("--preset", help="preset name (see `loracl list`)")
    r.add_argument("--method", help="method name (overrides the preset's)")
    r.add_argument("--seed", type=int)
    r.add_argument("--out", help="output folder (default runs/<preset>/<method>/seed<seed>)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    r.add_argument("--resume", action="store_true", help="continue a stopped run in --out from its last checkpoint")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal)")
    r.set_defaults(fn=cmd_run)

    ls = sub.add_parser("list", help="show presets and methods")
    ls.set_defaults(fn=cmd_list)

    c = sub.add_parser("compare", help="table (mean +- std over seeds) of finished runs")
    c.add_argument("dirs", nargs="+", help="run folders, or folders containing runs")
    c.add_argument("--out", help="write the table here (.md; a .json beside it)")
    c.add_argument("--ref", help="method whose FLOPs the ratios are relative to (default: the first row)")
    c.set_defaults(fn=cmd_compare)

    rep = sub.add_parser("report", help="(re)write report.html of a run folder")
    rep.add_argument("dir")
    rep.set_defaults(fn=cmd_report)

    e = sub.add_parser("export", help="the final model of a finished run, branches merged, as a plain timm / "
                                      "open_clip state dict (safetensors) plus head and preprocessing (JSON)")
    e.add_argument("dir", help="run folder")
    e.add_argument("--out", help="output folder (default RUN_DIR/export)")
    e.set_defaults(fn=cmd_export)

    pr = sub.add_parser("predict", help="top-k class names of images with a finished run's final model")
    pr.add_argument("dir", help="run folder")
    pr.add_argument("paths", nargs="+", help="images or folders (searched recursively)")
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--out", help="write here (.csv or .json; default: CSV on stdout)")
    pr.add_argument("--format", choices=["csv", "json"], help="default: from --out's suffix, else csv")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--device", default="auto", help="auto, cpu or cuda")
    pr.add_argument("--workers", type=int, default=0, help="image-decoding processes")
    pr.set_defaults(fn=cmd_predict)

    d = sub.add_parser("demo", help="run the embedded offline demo and print the comparison")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--methods", nargs="+", help=f"default: {' '.join(DEMO_METHODS)}")
    d.add_argument("--set", action="append", metavar="KEY=VALUE")
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    d.set_defaults(fn=cmd_demo)

    from .bench.run import add_parser as add_bench
    from .data.check import add_parser as add_data
    from .runs.sweep import add_parser as add_sweep

    add_sweep(sub)
    add_data(sub)
    add_bench(sub)
    return p


try:
    from torch import (
        OutOfMemoryError as _OutOfMemory,  # CUDA's (a RuntimeError, not a MemoryError)
    )
except ImportError:  # pragma: no cover - older torch
    class _OutOfMemory(Exception):
        pass


def _terminate(signum, frame):
    raise KeyboardInterrupt


def one_line(msg: str) -> str:
    """A DataLoader worker re-raises our error with its traceback folded into the message: keep our line."""
    if "Traceback" in msg:
        last = [l for l in msg.strip().splitlines() if l.strip()][-1]
        return last.split(": ", 1)[1] if last.startswith("loracl.errors.") else last
    return msg


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("LORACL_PROGRESS") and getattr(args, "progress", None) is None:
        args.progress = os.environ["LORACL_PROGRESS"] not in ("0", "false")
    if threading.current_thread() is threading.main_thread():
        # a cluster's preemption or `kill` (SIGTERM) stops like Ctrl-C: finished tasks saved, the lock released
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.fn(args)
    except LoraclError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `loracl predict ... | head`
        return 0
    except (MemoryError, _OutOfMemory) as e:
        first = (str(e).strip().splitlines() or ["host memory"])[0][:160]
        print(f"error: out of memory ({first}); lower data.batch_size or data.eval_batch_size, or use "
              f"train.amp; finished tasks are saved, continue with --resume", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not about a file the user gave: a bug, keep the traceback
            raise
        # an output folder that became unwritable, a full disk: the environment, not loracl
        print(f"error: cannot write or read {e.filename}: {e.strerror or e}; finished tasks are saved in their "
              f"checkpoints", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished tasks are saved; continue with the same command plus --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
