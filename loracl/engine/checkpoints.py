"""Checkpoints of a run: one per finished task, one mid-task every `train.checkpoint_every` steps.

A task checkpoint holds the model tensors that differ from the pretrained model, the model's structure
(branches, head chunks, owned modules), the method's state and the results so far. A step checkpoint adds
the optimiser, scheduler, scaler, RNG and cost so far; it is removed once its task is done. Only rank 0
writes. The manager holds the model and the record; whatever else a checkpoint holds (the method's state, other
stateful steps of the run) is handed to it by the runner.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import dist
from ..errors import CheckpointError, TrainingDiverged
from ..models.model import ContinualModel
from ..runs.statefile import atomic_save, changed_state, digests, load, nonfinite
from .record import RunRecord


class CheckpointManager:
    def __init__(self, out: Path, model: ContinualModel, record: RunRecord, device: torch.device, log=print,
                 keep: int | None = None):
        self.dir = Path(out) / "checkpoints"
        self.keep = keep  # newest task checkpoints kept (None: all)
        self.model, self.record, self.device, self.log = model, record, device, log
        self.base_digests = digests(model)  # the pretrained model, before any method touched it

    def model_state(self) -> dict:
        return {"structure": self.model.structure(), "model": changed_state(self.model, self.base_digests)}

    def load_model_state(self, state: dict, where: str = "the checkpoint") -> None:
        """The model as a checkpoint holds it: its structure rebuilt, then its changed tensors loaded. A checkpoint
        of another model (another method, architecture or LoRA layout) is refused in one line, not a traceback."""
        self.check_sizes(state["structure"], where)
        try:
            self.model.rebuild(state["structure"])
            self.model.to(self.device)
            missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CheckpointError(f"{where} does not fit this run's model (its config: method, backbone, LoRA "
                                  f"settings): {first}") from None
        if unexpected:
            raise CheckpointError(f"{where} does not fit this run's model (unexpected keys {unexpected[:3]})")

    def check_sizes(self, structure, where: str) -> None:
        """Before anything is allocated: the branches a checkpoint describes fit their sites (dimensions, ranks
        within reach of the weight) and its head holds only the scenario's classes, so a damaged or foreign file
        cannot ask for a matrix of absurd size."""
        def refuse(what: str):
            raise CheckpointError(f"{where} does not fit this run's model: {what}")

        if not isinstance(structure, dict):
            refuse("no model structure")
        n = len(self.record.scenario.class_names)
        head = structure.get("head") or {}
        ids = [i for chunk in head.get("chunk_ids", []) for i in chunk] + list(head.get("prompts", {}))
        if any(not str(i).isdigit() or int(i) >= n for i in ids):
            refuse(f"its head names classes outside the {n} of this run's benchmark")
        lora, sites = structure.get("lora"), self.model.adapter.sites if self.model.adapter is not None else None
        if lora is None or sites is None:
            return
        if len(lora) != len(sites):
            refuse(f"{len(lora)} adapted projections where this run has {len(sites)} (other LoRA targets?)")
        for site, specs in zip(sites, lora):
            for sp in specs:
                dims = (sp.get("d_in", site.d_in), sp.get("d_out", site.d_out))
                rank = sum(sp["ranks"]) if "ranks" in sp else sp.get("rank", sp.get("width", 0))
                if dims != (site.d_in, site.d_out) or not 0 <= int(rank) <= 64 * (site.d_in + site.d_out):
                    refuse(f"a branch of {site.name} of shape {dims} and rank {rank}, where the weight is "
                           f"({site.d_in}, {site.d_out})")

    def save_task(self, task_index: int, method: dict, components: dict) -> None:
        """After a task: the model, the method's state, the other stateful steps' (`components`, by name)."""
        if not dist.is_main():
            return
        state = {"task": task_index, **self.model_state(), "method": method, "results": self.record.results,
                 "components": components}
        self._save_good(state, self.dir / f"task_{task_index:02d}.pt", f"after task {task_index}")
        self.drop_step()
        if self.keep is not None:  # only once the new one is safely on disk
            for old in sorted(self.dir.glob("task_*.pt"))[:-self.keep]:
                old.unlink()

    def save_step(self, task, opt, sched, scaler, epoch, batch, step, method: dict) -> None:
        if not dist.is_main():
            return
        state = {"task": task.index, "epoch": epoch, "batch": batch, "step": step, **self.model_state(),
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                 "rng": torch.get_rng_state(), "method": method, **self.record.step_state()}
        self._save_good(state, self.dir / "step.pt", f"at step {step} of task {task.index}")

    def _save_good(self, state: dict, path: Path, when: str) -> None:
        """Only a finite state is ever written as a checkpoint, so the last good one stays good."""
        bad = nonfinite(state)
        if bad:
            raise TrainingDiverged(f"the training state {when} holds NaN or inf ({', '.join(bad[:3])}"
                                   f"{' ...' if len(bad) > 3 else ''}); it is not saved. Last good checkpoint: "
                                   f"{self.last_good() or 'none'}; lower the learning rate or set train.grad_clip")
        atomic_save(state, path, root=self.dir.parent)

    def drop_step(self) -> None:
        step = self.dir / "step.pt"
        if dist.is_main() and step.exists():
            step.unlink()

    def last_good(self) -> str | None:
        if (self.dir / "step.pt").exists():
            return str(self.dir / "step.pt")
        tasks = sorted(self.dir.glob("task_*.pt"))
        return str(tasks[-1]) if tasks else None

    def restore(self) -> tuple[int, dict | None, dict | None]:
        """Load the model and results of the newest readable task checkpoint, and find a later step checkpoint;
        returns (first task to run, the task checkpoint's state or None, the step state or None): the runner
        gives the method and components their parts. An unreadable checkpoint (truncated, foreign, holding NaN
        or inf: loracl never writes one, so it was damaged or tampered with) is passed over, and the log says so."""
        start, state, path = 0, None, None
        for path in sorted(self.dir.glob("task_*.pt"), reverse=True):
            try:
                state = checked(load(path), path)
                break
            except CheckpointError as e:
                self.log(f"{e}; falling back to an earlier checkpoint")
                state = None
        if state is not None:
            self.load_model_state(state, str(path))
            self.record.results = state["results"]
            start = state["task"] + 1
            self.log(f"resuming after task {start} from {path}")
        step_state = None
        if (self.dir / "step.pt").exists():
            try:
                s = checked(load(self.dir / "step.pt"), self.dir / "step.pt")
            except CheckpointError as e:
                self.log(f"{e}; resuming from the start of the task instead")
                s = {"task": -1}
            if s["task"] >= start:
                step_state = s
                self.log(f"resuming task {s['task'] + 1} at epoch {s['epoch'] + 1}, batch {s['batch']} "
                         f"from {self.dir / 'step.pt'}")
        if start == 0 and step_state is None:
            self.log("nothing to resume: starting from the beginning")
        return start, state, step_state

    def resume_task(self, state: dict) -> None:
        """Mid-task resume, after the task's `begin_task` re-ran: the model and the cost at the step (the runner
        gives the method its state)."""
        self.load_model_state(state, str(self.dir / "step.pt"))
        self.record.load_step_state(state)


def checked(state, path: Path) -> dict:
    """A loaded checkpoint that has the parts a restore reads and only finite tensors, else CheckpointError."""
    if not isinstance(state, dict) or not {"task", "structure", "model"} <= set(state):
        raise CheckpointError(f"checkpoint {path} lacks the parts of a loracl checkpoint (task, structure, model)")
    bad = nonfinite({"model": state["model"], "method": state.get("method")})
    if bad:
        raise CheckpointError(f"checkpoint {path} holds NaN or inf ({', '.join(bad[:3])})")
    return state
