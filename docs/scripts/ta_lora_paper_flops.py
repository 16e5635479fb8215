"""Training FLOPs of the task-arithmetic paper's protocols at full scale (ViT-B/16, 224 px), from per-sample
costs counted by loracl's FLOP meter on real steps of the real architecture (random weights: FLOPs do not
depend on them), next to the PFLOPs the paper reports.

    python docs/scripts/ta_lora_paper_flops.py

Per-sample costs (forward + backward, PyTorch's FLOP counter: 2 FLOPs per multiply-add):
  fwd     inference forward
  lora    ta-lora's training step (LoRA r=16 on q, v; frozen backbone), CE
  lora_kl the same with the KL regulariser (one extra forward of the pretrained model)
  full    full fine-tuning step (ER, A-GEM, joint-full, ta-lora's memory fine-tuning)
"""

from __future__ import annotations

import torch

from loracl.config import BackboneConfig
from loracl.engine.flops import FlopMeter
from loracl.methods.base import LoRAOptions
from loracl.methods.ta_lora import feature_kl
from loracl.models.backbones import create_backbone
from loracl.models.heads import LinearHead
from loracl.models.model import ContinualModel

B = 2
torch.manual_seed(0)
model = ContinualModel(create_backbone(BackboneConfig(name="vit_base_patch16_224", pretrained=False)),
                       LinearHead(768)).eval()
model.head.add_classes(list(range(10)))
ids = torch.arange(10)
x, y = torch.randn(B, 3, 224, 224), torch.randint(0, 10, (B,))
ce = torch.nn.functional.cross_entropy


def per_sample(fn) -> float:
    m = FlopMeter()
    m.step("p", B, fn)
    return m.by_phase["p"] / B


cost = {}
with torch.no_grad():
    cost["fwd"] = per_sample(lambda: model(x, ids))
model.inject_lora(LoRAOptions(rank=16, targets=["q", "v"]))
model.adapter.add_fresh(16, 1.0, "task0")  # PEFT's init: kaiming-uniform down, zero up
model.set_trainable("lora+head")
cost["lora"] = per_sample(lambda: ce(model(x, ids), y).backward())


def lora_kl():
    f = model.features(x)
    with torch.no_grad(), model.adapter.inactive():
        f0 = model.features(x)
    (0.6 * ce(model.head(f, ids), y) + 0.4 * feature_kl(f0, f)).backward()


cost["lora_kl"] = per_sample(lora_kl)
model.adapter.clear()
model.set_trainable("full+head")
cost["full"] = per_sample(lambda: ce(model(x, ids), y).backward())
print("per sample (GFLOPs):", {k: round(v / 1e9, 2) for k, v in cost.items()},
      "; ratios to fwd:", {k: round(v / cost["fwd"], 2) for k, v in cost.items()})

# (dataset, training images, classes per task, epochs, paper PFLOPs ER, paper PFLOPs task arithmetic)
PROTOCOLS = [("Pets", 3680, [6, 6, 6, 6, 6, 7], 50, 17.8, 3.49),
             ("Flowers-102 (train+val)", 2040, [10] * 9 + [12], 30, 6.14, 1.60),
             ("CIFAR-10", 50000, [2] * 5, 50, 237, 44.9)]
P = 1e15
print("\n| dataset | ER (counted) | TA, memory fine-tuned once (counted) | TA, after every task (counted) | "
      "ratio ER / TA once | paper ER | paper TA | paper ratio | paper-style TA (forward MACs only) | "
      "paper-style ER (3 x fwd MACs x (1 + replayed share)) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name, n, sizes, E, p_er, p_ta in PROTOCOLS:
    C = sum(sizes)
    per_task = [n * k / C for k in sizes]
    replayed = sum(per_task[1:])  # ER appends as many memory samples as new ones from the second task on
    er = E * (n + replayed) * cost["full"]
    mem = [10 * sum(sizes[: t + 1]) for t in range(len(sizes))]
    ta_once = E * n * cost["lora"] + E * mem[-1] * cost["full"]
    ta_every = E * n * cost["lora"] + E * sum(mem) * cost["full"]
    macs = cost["fwd"] / 2
    paper_style_ta = E * (n + mem[-1]) * macs
    paper_style_er = 3 * E * (n + replayed) * macs
    print(f"| {name} | {er / P:.2f} | {ta_once / P:.2f} | {ta_every / P:.2f} | {er / ta_once:.2f}x | {p_er} | {p_ta} | "
          f"{p_er / p_ta:.2f}x | {paper_style_ta / P:.2f} | {paper_style_er / P:.2f} |")
