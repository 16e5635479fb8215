"""FLOPs of CL-LoRA's inference per image on the cifar100-mini fixture ViT: shared prefix once + one specific
suffix per task seen, against one plain forward."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from loracl.cl.shared_specific import orthonormal_down, prefix, suffix
from loracl.models.backbones import create_backbone
from loracl.models.branches import WeightedBranch
from loracl.runs.assembly import load_config

cfg = load_config(preset="cifar100-mini", method="cl-lora")
bb = create_backbone(cfg.backbone, keep_pretrained_head=False)
vit = bb.model.eval()
ad = bb.inject_lora(["q", "v"])
g = torch.Generator().manual_seed(0)
for s in ad.sites:
    if s.block < 3:
        s.add_lora(orthonormal_down(8, s.d_in, g), torch.zeros(s.d_out, 8), tag="shared", train_down=False)
    else:
        s.add(WeightedBranch(orthonormal_down(8, s.d_in, g), torch.zeros(s.d_out, 8)), "task0")
x = torch.randn(1, 3, 32, 32)


def flops(fn):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return fc.get_total_flops()


with ad.selected({"shared", "task0"}):
    full = flops(lambda: bb.features(x))
    pre = flops(lambda: prefix(vit, x, 3))
    h = prefix(vit, x, 3)
    suf = flops(lambda: suffix(vit, h, 3))
with ad.selected({"shared"}):
    plain = flops(lambda: bb.features(x))
print(f"one full forward (shared + one task): {full / 1e6:.2f} MFLOPs; prefix {pre / 1e6:.2f}, suffix {suf / 1e6:.2f}")
for T in (1, 10, 20):
    c = pre + T * suf
    print(f"tasks seen {T}: {c / 1e6:.2f} MFLOPs per image = {c / full:.2f} x one forward "
          f"(re-running the whole net per task, as the official code: {T * full / 1e6:.2f})")
