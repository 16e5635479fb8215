"""Task arithmetic with LoRA for continual learning (Chitale et al., NeurIPS 2023 workshops, arXiv 2311.02428).

For each task i (METHODS.md section 3):
    1. from the pretrained weights theta_pre, train a fresh LoRA (query and value of every block, r = 16,
       alpha = 16) and the task's head on task i: the task model theta_i = theta_pre + tau_i.
       Loss: CE, or the optional 0.6 CE + 0.4 KL(softmax f_pre(x) || softmax f_lora(x)) on backbone features.
    2. combine the tasks so far:       theta = theta_pre + lambda * sum_{j <= i} tau_j      (lambda = 0.25)
    3. fine-tune theta on a class-balanced memory of 10 images per class of every task seen.
The model evaluated after task i is the one of step 3; the next task starts again from theta_pre, so every
task vector is learned on its own, as task arithmetic needs. Task vectors are kept as their LoRA factors
(`loracl.task_vectors`); dense differences are never formed.

Where the paper is silent (each a config key; the choice and its reason are repeated in the presets):
- heads: one linear head chunk per task, trained with its LoRA on the task's classes. The combination starts
  from every task's own chunk (the head of theta_i) and memory fine-tuning trains all chunks together over
  all seen classes: the chunks never saw each other's classes, and the memory is what calibrates them.
- memory fine-tuning (`memory_train`): `full` by default (every backbone weight and the head), because the
  paper fine-tunes theta, the combined weights themselves; `lora` (a fresh branch) and `head` are the cheaper
  alternatives. Epochs: the task's epochs (`memory_epochs`), task optimiser, CE over all seen classes. Each
  task's fine-tuning starts from the new combination; the previous fine-tuned model is discarded, so the final
  model is the one the paper's protocol (one fine-tuning after the last task, `memory_every_task: false`)
  gives, and the earlier fine-tunings only fill the accuracy matrix.
- KL: KL(P_pre || P_lora), P = softmax over the feature dimension of the pre-logits features: the frozen
  pretrained model is the target, as in distillation. Reduction `batchmean`, the KL of each sample averaged
  over the batch (PyTorch's `mean` would also divide by the feature dimension, 768 for ViT-B, and make the
  term vanish).
- lambda given as a list: each candidate forms the combination and the one with the best accuracy on the
  memory (the only data of old tasks a continual learner keeps) is used.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from .. import dist
from ..cl.memory import EpisodicMemory
from ..cl.task_vectors import (
    LowRankDelta,
    TaskVector,
    combined_delta,
    resolve_lambda,
    task_vector_of_branches,
)
from ..models.heads import LinearHead
from ..models.lora import task_tag
from . import register
from .base import Capabilities, LoRAOptions, Method

Lambda = float | Literal["1/N"]


class TALoRAConfig(LoRAOptions):
    rank: int = Field(16, ge=1)
    alpha: float | None = 16.0
    targets: list[str] = Field(default_factory=lambda: ["q", "v"])
    lam: Lambda | list[Lambda] = Field(0.25, description="scaling of the summed task vectors: a number, '1/N', "
                                                         "or a list (chosen by accuracy on the memory)")
    memory_per_class: int = Field(10, ge=0, description="images per class kept for fine-tuning the combination")
    memory_train: Literal["full", "lora", "head"] = Field("full", description="what memory fine-tuning trains")
    memory_epochs: int | None = Field(None, ge=0, description="epochs over the memory (None: the task's epochs)")
    memory_lr: float | None = Field(None, gt=0, description="learning rate of memory fine-tuning (None: train.optimizer.lr)")
    memory_batch_size: int | None = Field(None, ge=1, description="None: data.batch_size")
    memory_every_task: bool = Field(True, description="fine-tune on the memory after every task (a full accuracy "
                                                      "matrix); false: after the last task only, as the paper")
    kl_weight: float = Field(0.0, ge=0, le=1, description="w in (1 - w) CE + w KL; the paper's CE + KL is 0.4")
    kl_target: Literal["pretrained", "lora"] = Field("pretrained", description="P in KL(P || Q)")
    kl_reduction: Literal["batchmean", "mean"] = "batchmean"
    eval_before_memory: bool = Field(True, description="also record the accuracy of the combination before "
                                                       "memory fine-tuning (results.json: method_extras)")

    @field_validator("lam")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("give at least one lambda")
        return v


def feature_kl(f_pre: torch.Tensor, f_lora: torch.Tensor, target: str = "pretrained",
               reduction: str = "batchmean") -> torch.Tensor:
    """KL between the softmax distributions over the feature dimension of two feature batches (B x D)."""
    lp_pre, lp_lora = F.log_softmax(f_pre.float(), -1), F.log_softmax(f_lora.float(), -1)
    p, q = (lp_pre, lp_lora) if target == "pretrained" else (lp_lora, lp_pre)
    kl = (p.exp() * (p - q)).sum(-1).mean()  # per sample sum P (log P - log Q), averaged over the batch
    return kl if reduction == "batchmean" else kl / f_pre.shape[-1]  # "mean": nn.KLDivLoss()'s default


@register
class TaskArithmeticLoRA(Method):
    """Task arithmetic with LoRA: per-task LoRA task vectors, theta_pre + lambda * sum tau, memory fine-tuning."""

    name = "ta-lora"
    Config = TALoRAConfig
    # each task's head is part of its task model: tasks need their own classes
    caps = Capabilities(lora=True, all_params_every_step=True, scenarios=("class-incremental", "cross-dataset"))

    def setup(self):
        c = self.cfg
        self.model.inject_lora(c)
        self.memory = EpisodicMemory(self.run.scenario.tasks)
        self.task_vectors: list[TaskVector] = []
        self.task_heads: list[dict | None] = []
        self.lambdas: list[float] = []
        self.lambda_scores: list[dict[float, float]] = []
        # theta_pre of every weight that the combination or memory fine-tuning writes to, kept on the CPU
        if c.memory_train == "full":
            touched = [p for n, p in self.model.backbone.named_parameters()
                       if ".lora." not in n and not n.startswith("pretrained_head")]
        else:
            touched = [layer.weight for layer in self.model.adapter.layers]
        self.theta_pre = [(p, p.detach().to("cpu", copy=True)) for p in touched]

    # ---- step 1: a task vector per task, learned from theta_pre -------------------------------------
    def begin_task(self, task):
        self.restore_pretrained()
        self.model.adapter.clear()
        self.add_task_classes(task)
        # PEFT's init: kaiming-uniform down, zero up (tau_i starts at 0); the task's head chunk trains with it
        self.model.adapter.add_fresh(self.cfg.rank, self.cfg.scale, task_tag(task.index))
        linear = isinstance(self.model.head, LinearHead)
        self.model.set_trainable("lora+head", head=task.class_ids if linear else None)

    def loss(self, net, batch, task):
        ids = self.run.classes.train(task)
        w = self.cfg.kl_weight
        if w == 0:
            return super().loss(net, batch, task)
        logits, feats = net(batch.x, ids, return_features=True)
        ce = self.cross_entropy(logits, batch.y, ids)
        with torch.no_grad(), self.model.adapter.inactive():  # theta_pre: the task's branch off
            f_pre = self.model.features(batch.x)
        return (1 - w) * ce + w * feature_kl(f_pre, feats, self.cfg.kl_target, self.cfg.kl_reduction)

    # ---- steps 2 and 3 ------------------------------------------------------------------------------
    def end_task(self, task):
        self.task_vectors.append(task_vector_of_branches(self.model.adapter.sites, task_tag(task.index)))
        self.task_heads.append(self.task_head_state(task))
        self.model.adapter.clear()
        self.memory.add_class_balanced(task, seed=self.run.seed("memory", task.index),
                                       per_class=self.cfg.memory_per_class)
        lam = self.choose_lambda(task)
        self.lambdas.append(lam)
        self.form_combined_model(lam)
        if self.cfg.eval_before_memory:
            self.run.record("acc_matrix_before_memory", task.index,
                            self.run.evaluate_row(task.index, self.logits)[0])
        self.run.record("lambda", task.index, lam)
        if self.cfg.memory_every_task or task.index == len(self.run.scenario) - 1:
            self.memory_finetune(task)

    @torch.no_grad()
    def form_combined_model(self, lam: float) -> None:
        """theta_pre + lam * sum_i tau_i on the adapted weights, from the factors; each task's own head chunk."""
        self.restore_pretrained()
        self.model.adapter.clear()
        for s in self.model.adapter.sites:
            s.add_to_weight(combined_delta([tv[s.name] for tv in self.task_vectors], lam))
        for st in self.task_heads:
            if st is not None:
                chunk = self.model.head.chunk_of(st["ids"])
                chunk.weight.copy_(st["weight"])
                if st["bias"] is not None:
                    chunk.bias.copy_(st["bias"])

    def choose_lambda(self, task) -> float:
        lams = self.cfg.lam if isinstance(self.cfg.lam, list) else [self.cfg.lam]
        cands = [resolve_lambda(x, len(self.task_vectors)) for x in lams]
        if len(cands) == 1:
            return cands[0]
        scores = {}
        for lam in cands:
            self.form_combined_model(lam)
            scores[lam] = self.memory_accuracy(task)
        self.lambda_scores.append(scores)
        self.run.record("lambda_memory_accuracy", task.index, {str(k): v for k, v in scores.items()})
        return max(cands, key=lambda x: scores[x])  # the first of equals

    def memory_accuracy(self, task) -> float:
        ids = self.run.classes.tensor(self.run.scenario.seen_classes(task.index))
        hits = torch.zeros(2, dtype=torch.long, device=self.model.device)

        def fn(b):
            hits[0] += (ids[self.logits(b.x, ids).argmax(-1)] == b.y).sum()
            hits[1] += len(b.y)

        self.model.eval()
        self.run.forward_pass(self.memory.images(), fn, desc="lambda-select", view="test")
        dist.all_reduce_sum_(hits)
        return 100.0 * float(hits[0]) / max(int(hits[1]), 1)

    def memory_finetune(self, task) -> None:
        c = self.cfg
        if len(self.memory) == 0 or c.memory_epochs == 0:
            return
        if c.memory_train == "lora":
            self.model.adapter.add_fresh(c.rank, c.scale, "memory")
            self.model.set_trainable("lora+head")
        else:
            self.model.set_trainable("full+head" if c.memory_train == "full" else "head")
        seen = self.run.classes.tensor(self.run.scenario.seen_classes(task.index))
        self.run.fit(task, phase="memory", images=self.memory.images(), epochs=c.memory_epochs,
                     groups=self.model.param_groups(), loss=lambda net, b, t: self.cross_entropy(net(b.x, seen), b.y, seen),
                     lr=c.memory_lr, batch_size=c.memory_batch_size)
        self.model.set_trainable("none")

    # ---- helpers ------------------------------------------------------------------------------------
    @torch.no_grad()
    def restore_pretrained(self) -> None:
        for p, saved in self.theta_pre:
            p.copy_(saved)

    def task_head_state(self, task) -> dict | None:
        if not isinstance(self.model.head, LinearHead):
            return None
        chunk = self.model.head.chunk_of(task.class_ids)
        return {"ids": list(task.class_ids), "weight": chunk.weight.detach().cpu().clone(),
                "bias": None if chunk.bias is None else chunk.bias.detach().cpu().clone()}

    def state_dict(self):
        return {"task_vectors": [{k: d.state() for k, d in tv.items()} for tv in self.task_vectors],
                "task_heads": self.task_heads, "memory": self.memory.state_dict(), "lambdas": self.lambdas,
                "lambda_scores": self.lambda_scores}

    def load_state_dict(self, state):
        self.task_vectors = [{k: LowRankDelta.from_state(d) for k, d in tv.items()} for tv in state["task_vectors"]]
        self.task_heads = state["task_heads"]
        self.memory.load_state_dict(state["memory"])
        self.lambdas = list(state["lambdas"])
        self.lambda_scores = list(state["lambda_scores"])
