"""Token statistics: accumulated in batches (and over processes) they equal the covariance of the whole set."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loracl.models.lora import LoRALayer
from loracl.cl.statistics import SecondMoment, forward_until, layer_input_moments


def _tokens(n=37, t=5, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g) * torch.linspace(0.1, 3.0, d) + 0.5


@pytest.mark.parametrize("bs", [1, 4, 37])
def test_second_moment_in_batches_equals_whole_set(bs):
    X = _tokens()
    flat = X.reshape(-1, X.shape[-1]).double()
    ref = flat.t() @ flat / flat.shape[0]
    acc = SecondMoment(X.shape[-1])
    for k in range(0, len(X), bs):
        acc.update(X[k:k + bs])
    torch.testing.assert_close(acc.finalize().double(), ref, atol=1e-5, rtol=1e-5)
    assert int(acc.count) == X.shape[0] * X.shape[1]


def test_layer_taps_batch_size_invariant(tiny_vit):
    """Moments of every adapted layer's input over a tiny ViT: the same whatever the batch size, and equal to
    X^T X / N of the inputs captured directly."""
    from loracl.models.backbones import TimmViT

    bb = TimmViT.__new__(TimmViT)
    torch.nn.Module.__init__(bb)
    bb.model = tiny_vit
    ad = bb.inject_lora(["k", "v", "fc1"])
    images = torch.randn(11, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    captured = {id(l): [] for l in ad.layers}
    handles = [(l, l.add_tap(lambda x, l=l: captured[id(l)].append(x.detach().reshape(-1, x.shape[-1]))))
               for l in ad.layers]
    with torch.no_grad():
        tiny_vit(images)
    for l, h in handles:
        l.remove_tap(h)
    results = []
    for bs in (2, 5, 11):
        with layer_input_moments(ad.layers) as acc, torch.no_grad():
            for k in range(0, 11, bs):
                tiny_vit(images[k:k + bs])
        results.append({id(l): acc[l].finalize() for l in ad.layers})
    for l in ad.layers:
        H = torch.cat(captured[id(l)]).double()
        ref = H.t() @ H / H.shape[0]
        for r in results:
            torch.testing.assert_close(r[id(l)].double(), ref, atol=1e-4, rtol=1e-4)


def test_forward_until_stops_after_the_last_tapped_layer(tiny_vit):
    """A pass over block 0's layers ends before block 1 runs, and gathers the moments a whole forward gathers;
    a forward that never reaches one of the layers runs whole."""
    from loracl.models.backbones import TimmViT

    bb = TimmViT.__new__(TimmViT)
    torch.nn.Module.__init__(bb)
    bb.model = tiny_vit
    ad = bb.inject_lora(["k", "v", "fc1"], blocks=[0])
    images = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    calls = []
    hook = tiny_vit.blocks[1].register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    elsewhere = LoRALayer(torch.nn.Linear(4, 4), "weight", {"all": (0, 4)})  # in no forward of tiny_vit
    with torch.no_grad():
        with layer_input_moments(ad.layers) as whole:
            tiny_vit(images)
        assert calls == [7]
        with layer_input_moments(ad.layers) as cut, forward_until(ad.layers) as run:
            run(lambda: tiny_vit(images))
        assert calls == [7]  # block 1 never ran
        with forward_until(ad.layers + [elsewhere]) as run:
            run(lambda: tiny_vit(images[:2]))
        assert calls == [7, 2]
    hook.remove()
    assert all(not layer.taps for layer in ad.layers + [elsewhere])
    for layer in ad.layers:
        assert int(cut[layer].count) == int(whole[layer].count) > 0
        torch.testing.assert_close(cut[layer].finalize(), whole[layer].finalize())


def _worker(rank, world, init_file, X, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        acc = SecondMoment(X.shape[-1])
        shard = X[rank::world]  # unequal shards: 37 samples over 2 processes
        for k in range(0, len(shard), 3):
            acc.update(shard[k:k + 3])
        C = acc.finalize()
        if rank == 0:
            torch.save({"C": C, "count": acc.count}, out_file)
    finally:
        dist.destroy_process_group()


def test_second_moment_sums_across_processes():
    X = _tokens()
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(2, init_file, X, out_file), nprocs=2, join=True)
        got = torch.load(out_file)
    flat = X.reshape(-1, X.shape[-1]).double()
    torch.testing.assert_close(got["C"].double(), flat.t() @ flat / flat.shape[0], atol=1e-5, rtol=1e-5)
    assert int(got["count"]) == flat.shape[0]
