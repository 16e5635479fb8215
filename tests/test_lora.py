"""LoRA injection into real timm and open_clip modules: slicing, merge/unmerge exactness, taps."""

import pytest
import torch

from loracl.models.lora import Branch, LoRAAdapter


def _vit_adapter(model, kinds):
    from loracl.models.backbones import TimmViT

    bb = TimmViT.__new__(TimmViT)
    torch.nn.Module.__init__(bb)
    bb.model = model
    return bb, bb.inject_lora(kinds)


def _random_branches(adapter: LoRAAdapter, rank=3, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    for s in adapter.sites:
        for k in range(n):
            s.add_lora(torch.randn(rank, s.d_in, generator=g) * 0.1, torch.randn(s.d_out, rank, generator=g) * 0.1,
                       tag=f"task{k}", scale=0.5)


def test_qkv_slices_change_only_their_rows(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    qkv = tiny_vit.blocks[0].attn.qkv
    seen = {}
    h = qkv.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o.detach().clone()))
    tiny_vit(x)
    base = seen["out"]
    h.remove()
    bb, ad = _vit_adapter(tiny_vit, ["k"])
    site = [s for s in ad.sites if s.block == 0][0]
    site.add_lora(torch.randn(2, site.d_in), torch.randn(site.d_out, 2), tag="task0")
    h = qkv.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o.detach().clone()))
    tiny_vit(x)
    d = seen["out"].shape[-1] // 3
    diff = (seen["out"] - base).abs()
    assert diff[..., :d].max() == 0 and diff[..., 2 * d:].max() == 0
    assert diff[..., d:2 * d].max() > 1e-3
    h.remove()


@pytest.mark.parametrize("kinds", [["q", "k", "v"], ["k", "v", "out", "fc1", "fc2"]])
def test_timm_merge_equals_branches_and_unmerge_restores(tiny_vit, kinds):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y0 = tiny_vit(x)
        bb, ad = _vit_adapter(tiny_vit, kinds)
        _random_branches(ad, n=2)
        y_branches = tiny_vit(x)
        assert (y_branches - y0).abs().max() > 1e-3, "branches must change the function"
        w0 = {s.name: s.weight().clone() for s in ad.sites}
        merged = {s.name: [s.merge("task0"), s.merge("task1")] for s in ad.sites}
        assert ad.live_branches() == 0
        y_merged = tiny_vit(x)
        torch.testing.assert_close(y_merged, y_branches, atol=1e-5, rtol=1e-5)
        for s in ad.sites:
            for k, br in enumerate(merged[s.name]):
                s.layer.unmerge(s.slice, br, f"task{k}")
        torch.testing.assert_close(tiny_vit(x), y_branches, atol=1e-5, rtol=1e-5)
        ad.clear()
        for s in ad.sites:
            torch.testing.assert_close(s.weight(), w0[s.name], atol=1e-6, rtol=0)
        torch.testing.assert_close(tiny_vit(x), y0, atol=1e-5, rtol=1e-5)


def test_clip_mha_lora_matches_reference_and_merges(tiny_clip):
    """The LoRA-aware MultiheadAttention computes what nn.MultiheadAttention computes, in both encoders."""
    m = tiny_clip.model
    img = torch.randn(2, 3, 32, 32)
    tok = tiny_clip.tokenize(["a photo of a cat", "a sketch of a dog"])
    with torch.no_grad():
        ref_i, ref_t = m.encode_image(img), m.encode_text(tok)
        ad = tiny_clip.inject_lora(["q", "k", "v", "out"])
        assert len(ad.sites) == 4 * (2 + 2)
        torch.testing.assert_close(m.encode_image(img), ref_i, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.encode_text(tok), ref_t, atol=1e-5, rtol=1e-5)
        _random_branches(ad, n=1, seed=1)
        yi, yt = m.encode_image(img), m.encode_text(tok)
        assert (yi - ref_i).abs().max() > 1e-4 and (yt - ref_t).abs().max() > 1e-4
        ad.merge_all()
        torch.testing.assert_close(m.encode_image(img), yi, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.encode_text(tok), yt, atol=1e-5, rtol=1e-5)


def test_taps_see_layer_inputs(tiny_vit):
    bb, ad = _vit_adapter(tiny_vit, ["k", "v"])
    layer = ad.layers[1]
    got = []
    h = layer.add_tap(lambda x: got.append(x.shape))
    tiny_vit(torch.randn(2, 3, 32, 32))
    layer.remove_tap(h)
    tiny_vit(torch.randn(2, 3, 32, 32))
    assert got == [torch.Size([2, 17, 48])]


def test_inactive_context_skips_branches(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = tiny_vit(x)
        bb, ad = _vit_adapter(tiny_vit, ["q", "v"])
        _random_branches(ad)
        with ad.inactive():
            torch.testing.assert_close(tiny_vit(x), y0)
        assert (tiny_vit(x) - y0).abs().max() > 1e-4


def test_branch_delta_weight():
    br = Branch(torch.randn(2, 5), torch.randn(4, 2), scale=0.25)
    x = torch.randn(7, 5)
    torch.testing.assert_close(br(x), x @ br.delta_weight().t())


def test_linear_head_rebuild_twice():
    """Rebuilding a head that already knows classes (loading a second checkpoint into the same model)."""
    from loracl.models.heads import LinearHead

    h = LinearHead(8)
    h.add_classes([0, 1])
    h.rebuild({"chunk_ids": [[0, 1]]})
    h.rebuild({"chunk_ids": [[0, 1], [2, 3]]})
    assert h.chunk_ids == [[0, 1], [2, 3]] and len(h.chunks) == 2
    assert h(torch.randn(3, 8), torch.tensor([3, 0])).shape == (3, 2)


@pytest.mark.parametrize("cosine", [False, True])
def test_linear_head_logits_if_known(cosine):
    """The head's logits where it holds every asked class; zeros where it misses one (also an id beyond
    every chunk, or before any chunk), the same shape either way."""
    from loracl.models.heads import LinearHead

    h = LinearHead(8, cosine=cosine)
    f = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(h.logits_if_known(f, torch.tensor([0, 1])), torch.zeros(3, 2))
    h.add_classes([0, 1])
    h.add_classes([4, 5, 6])
    for ids in ([5, 0], [4, 5, 6, 1], [1]):
        ids = torch.tensor(ids)
        torch.testing.assert_close(h.logits_if_known(f, ids), h(f, ids))
        assert h.logits_if_known(f, ids).abs().sum() > 0
    for ids in ([0, 2], [6, 9], [3]):  # 2, 3: inside the id range but in no chunk; 9: beyond it
        assert torch.equal(h.logits_if_known(f, torch.tensor(ids)), torch.zeros(3, len(ids)))


def test_branches_are_named_and_their_verbs_act_by_tag(tiny_vit):
    """add / pop / freeze / merge address a branch by its tag, never by position; the structure a checkpoint
    keeps names them, and a rebuild (with a checkpoint written before tags, by position) restores them."""
    x = torch.randn(2, 3, 32, 32)
    bb, ad = _vit_adapter(tiny_vit, ["q", "v"])
    _random_branches(ad, n=3)
    with torch.no_grad():
        y3 = tiny_vit(x)
    s = ad.sites[0]
    assert list(s.branches) == ["task0", "task1", "task2"]
    with pytest.raises(ValueError, match="already holds a branch tagged 'task1'"):
        s.add_lora(torch.zeros(2, s.d_in), torch.zeros(s.d_out, 2), tag="task1")
    ad.freeze("task1")
    assert all(not p.requires_grad for br in ad.branches("task1") for p in br.parameters())
    assert all(br.up.requires_grad for br in ad.branches("task2"))
    popped = ad.pop("task1")
    assert len(popped) == len(ad.sites) and all(list(t.branches) == ["task0", "task2"] for t in ad.sites)
    spec = ad.structure()
    assert [sp["tag"] for sp in spec[0]] == ["task0", "task2"]
    saved = {k: v.clone() for k, v in tiny_vit.state_dict().items() if ".lora." in k}
    assert any(".branches.q.task2.up" in k for k in saved)
    with torch.no_grad():
        y2 = tiny_vit(x)
    ad.rebuild(spec)
    tiny_vit.load_state_dict(saved, strict=False)
    with torch.no_grad():
        assert torch.equal(tiny_vit(x), y2) and not torch.equal(y2, y3)
    legacy = [[{k: v for k, v in sp.items() if k != "tag"} for sp in site] for site in spec]
    ad.rebuild(legacy)  # a checkpoint from before tags: its branches are named by position, as its keys are
    assert list(ad.sites[0].branches) == ["0", "1"]


def test_parallel_adapters_beside_the_mlp(tiny_vit):
    """The `mlp` site holds parallel adapters (several per block, MoE-Adapters' room): they start as no-ops,
    act once trained, cannot be merged, and round-trip through the structure of a checkpoint."""
    from loracl.models.branches import Adapter

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = tiny_vit(x)
    bb, ad = _vit_adapter(tiny_vit, ["mlp"])
    s = ad.sites[0]
    assert s.kind == "mlp" and s.d_in == s.d_out == 48
    for k in range(2):
        for t in ad.sites:
            t.add(Adapter(t.d_in, t.d_out, width=8), f"expert{k}")
    with torch.no_grad():
        assert torch.equal(tiny_vit(x), y0)  # zero up-projections: nothing changes
        s.branches["expert1"].up.weight.normal_()
        y1 = tiny_vit(x)
    assert (y1 - y0).abs().max() > 1e-4
    with pytest.raises(TypeError, match="cannot be merged"):
        s.merge("expert1")
    spec = ad.structure()
    saved = {k: v.clone() for k, v in tiny_vit.state_dict().items() if ".lora." in k}
    ad.rebuild(spec)
    tiny_vit.load_state_dict(saved, strict=False)
    with torch.no_grad():
        assert torch.equal(tiny_vit(x), y1)
