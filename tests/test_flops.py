"""FLOPs counted by PyTorch's FlopCounterMode on real steps match hand counts of known layers."""

import pytest
import torch

from loracl.engine.flops import FlopMeter


def _step_flops(fn, batch_size=1):
    meter = FlopMeter()
    meter.step("p", batch_size, fn)
    return meter.by_phase["p"]


def test_linear_forward_backward_matches_hand_count():
    B, d_in, d_out = 7, 33, 19
    lin = torch.nn.Linear(d_in, d_out)
    x = torch.randn(B, d_in)
    fwd = 2 * B * d_in * d_out  # one multiply and one add per weight per sample
    assert _step_flops(lambda: lin(x), B) == fwd
    # trained weight, input without grad: forward + weight gradient (dW = dy^T x)
    assert _step_flops(lambda: lin(x).sum().backward(), B) == 2 * fwd
    # and an input that needs its gradient too (dx = dy W): a layer inside a network
    xg = x.clone().requires_grad_(True)
    assert _step_flops(lambda: lin(xg).sum().backward(), B) == 3 * fwd
    # frozen weight (LoRA training of the layers behind): forward + input gradient only
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(False)
    assert _step_flops(lambda: lin(xg).sum().backward(), B) == 2 * fwd


def test_lora_branch_adds_its_two_products():
    from loracl.models.lora import Branch

    B, d, r = 5, 24, 4
    br = Branch(torch.randn(r, d), torch.randn(d, r))
    x = torch.randn(B, d)
    assert _step_flops(lambda: br(x), B) == 2 * B * d * r * 2


def test_vit_forward_matches_hand_count():
    """The fixture architecture (img 32, patch 4, width 128, depth 6, 4 heads): patch embedding, q/k/v,
    attention scores and weighted values, output projection and MLP of every block."""
    import timm

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=128,
                          depth=6, num_heads=4, num_classes=0).eval()
    B, N, d, P = 2, 65, 128, 64  # 64 patches + class token
    patch = 2 * P * d * (3 * 4 * 4)
    block = 2 * N * d * 3 * d + 2 * (2 * N * N * d) + 2 * N * d * d + 2 * (2 * N * d * 4 * d)
    with torch.no_grad():
        assert _step_flops(lambda: m(torch.randn(B, 3, 32, 32)), B) == B * (patch + 6 * block)


def test_meter_scales_later_steps_by_batch_size():
    lin = torch.nn.Linear(8, 8)
    meter = FlopMeter()
    for b in (4, 4, 2):
        meter.step("p", b, lambda: lin(torch.randn(b, 8)))
    assert meter.by_phase["p"] == pytest.approx(2 * 8 * 8 * 10)


def test_meter_counts_each_batch_size_once_so_fixed_extra_work_is_exact():
    """A step with a fixed-size extra pass (A-GEM's reference gradient) is not proportional to its batch."""
    lin = torch.nn.Linear(8, 8)
    meter = FlopMeter()
    per = 2 * 8 * 8
    for b in (4, 4, 2, 4, 2):
        meter.step("p", b, lambda: (lin(torch.randn(b, 8)), lin(torch.randn(3, 8))))
    assert meter.by_phase["p"] == per * (16 + 5 * 3)
    meter.new_phase("p")
    assert meter.per_sample == {}
