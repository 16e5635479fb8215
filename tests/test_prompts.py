"""Prompts in the existing attention modules (L2P, DualPrompt, CODA-Prompt): the slots change nothing until a
prefix is set, a prefix adds exactly its keys and values, the selection and Gram-Schmidt math, and tiny runs of
the three methods on real images (timm fixture and a tiny CLIP) with the backbone left bit-identical."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CLIP, interrupted_at_step_checkpoint, smoke_sets
from loracl.runs.statefile import digests, load
from loracl.cli import main
from loracl.runs.assembly import load_config
from loracl.methods.coda_prompt import CodaComponents, CodaPromptConfig, CodaPrompts
from loracl.methods.l2p import key_matching_loss
from loracl.models.attention import Prefix, attach_mha, patch_attention, prefix_slots, prefixed
from loracl.models.branches import Branch
from loracl.models.lora import attach_linear
from loracl.models.prompts import QueryMemo, cosine_topk, gram_schmidt, split_prefix
from loracl.runs.runner import Runner

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = ["l2p", "dualprompt", "coda-prompt"]


def _spy_sdpa(monkeypatch):
    """Record the q, k, v shapes of every scaled_dot_product_attention call."""
    seen, orig = [], F.scaled_dot_product_attention

    def sdpa(q, k, v, *a, **kw):
        seen.append((q.shape, k.shape, v.shape))
        return orig(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    return seen


def _attention_by_hand(q, k, v, pk, pv, heads):
    """softmax(q [pk; k]^T / sqrt(d)) [pv; v] per head, tokens B x N x C -> B x N x C."""
    B, N, C = q.shape
    D = C // heads
    split = lambda t: t.reshape(B, -1, heads, D).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(torch.cat([pk, k], 1)), split(torch.cat([pv, v], 1))
    a = (q @ k.transpose(-2, -1) * D ** -0.5).softmax(-1)
    return (a @ v).transpose(1, 2).reshape(B, N, C)


def test_empty_slots_are_bit_identical_timm(tiny_vit):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = tiny_vit(x)
        for blk in tiny_vit.blocks:
            patch_attention(blk.attn)
        assert torch.equal(tiny_vit(x), y0)
        # with LoRA on the fused qkv: the prompted model without a prefix is the LoRA model
        layer = attach_linear(tiny_vit.blocks[0].attn.qkv, {"q": (0, 48)})
        layer.add("q", Branch(torch.randn(2, 48), torch.randn(48, 2)), "task0")
        y1 = tiny_vit(x)
        assert not torch.equal(y1, y0)
        a = tiny_vit.blocks[0].attn
        with prefixed({0: a}, {0: Prefix(torch.randn(3, 2, 48), torch.randn(3, 2, 48))}):
            assert not torch.equal(tiny_vit(x), y1)
        assert a.prefix is None and torch.equal(tiny_vit(x), y1)


def test_empty_slots_are_bit_identical_open_clip(tiny_clip):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blocks = tiny_clip.encoder_blocks()["image"]
    with torch.no_grad():
        y0 = tiny_clip.features(x)
        prefix_slots(tiny_clip, [0, 1])
        assert torch.equal(tiny_clip.features(x), y0)
        # a LoRA-aware attention (LoRA attached before or after the slot) keeps its own forward
        attach_mha(blocks[1].attn, {"v": (128, 192)})
        y1 = tiny_clip.features(x)
        attach_mha(tiny_clip.encoder_blocks()["text"][0].attn, {"q": (0, 48)})
        prefix_slots(tiny_clip, [0, 1])
        assert torch.equal(tiny_clip.features(x), y1)


def test_timm_prefix_adds_half_keys_and_values_only(tiny_vit, monkeypatch):
    torch.manual_seed(0)
    attn = patch_attention(tiny_vit.blocks[0].attn)
    layer = attach_linear(attn.qkv, {"k": (48, 96)})  # a LoRA branch on k: the prefix path must use the hook
    layer.add("k", Branch(torch.randn(2, 48), torch.randn(48, 2)), "task0")
    x = torch.randn(2, 5, 48)
    prompt = torch.randn(2, 6, 48)  # L = 6: 3 key tokens, 3 value tokens
    prefix = split_prefix(prompt)
    pk, pv = prefix.keys, prefix.values
    assert pk.shape == pv.shape == (2, 3, 48) and prefix.mode == "concat"
    torch.testing.assert_close(torch.cat([pk, pv], 1), prompt)
    seen = _spy_sdpa(monkeypatch)
    with torch.no_grad(), prefixed({0: attn}, {0: prefix}):
        y = attn(x)
    assert seen == [((2, 3, 5, 16), (2, 3, 8, 16), (2, 3, 8, 16))]  # queries: the 5 tokens; keys, values: 3 + 5
    q, k, v = attn.qkv(x).detach().chunk(3, -1)
    torch.testing.assert_close(y, attn.proj(_attention_by_hand(q, k, v, pk, pv, 3)).detach())


def test_open_clip_prefix_adds_half_keys_and_values_only(tiny_clip, monkeypatch):
    torch.manual_seed(0)
    attn = prefix_slots(tiny_clip, [0])[0]
    x = torch.randn(2, 5, 64)
    prefix = split_prefix(torch.randn(2, 8, 64))
    pk, pv = prefix.keys, prefix.values
    seen = _spy_sdpa(monkeypatch)
    with torch.no_grad(), prefixed({0: attn}, {0: prefix}):
        y = attn(x, x, x, need_weights=False)[0]
    assert [s[1][2] for s in seen] == [4 + 5] and seen[0][0][2] == 5
    with torch.no_grad():
        q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
        torch.testing.assert_close(y, attn.out_proj(_attention_by_hand(q, k, v, pk, pv, attn.num_heads)))
        # a causal-style mask over the tokens: the prefix keys stay visible to every query
        mask = torch.full((5, 5), float("-inf")).triu(1)
        with prefixed({0: attn}, {0: prefix}):
            ym = attn(x, x, x, need_weights=False, attn_mask=mask)[0]
        s = attn.in_proj_weight.shape[0] // 3
        assert ym.shape == y.shape and torch.isfinite(ym).all() and s == 64


def test_cosine_topk_on_a_constructed_pool():
    keys = torch.eye(6)[:5] * torch.tensor([[1.0], [3.0], [0.5], [2.0], [7.0]])  # norms must not matter
    q = torch.tensor([[0.1, 0.9, 0.2, 0.5, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]]) * 4.0
    cos, idx = cosine_topk(q, keys, 3)
    assert idx[0].tolist() == [1, 3, 2] and idx[1, 0].item() == 4
    torch.testing.assert_close(cos[0], F.normalize(q[0], dim=0)[:5])
    # the official loss indexes the B x M cosines with the B x N indices: B x B x N terms, batch-summed
    q, keys, i = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([[0, 1], [2, 3], [4, 0]])
    c = F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).t()
    official = sum(1 - c[b, i[b2, j]] for b in range(3) for b2 in range(3) for j in range(2))
    paper = sum(1 - c[b, i[b, j]] for b in range(3) for j in range(2)) / 3
    torch.testing.assert_close(key_matching_loss(q, keys, i, "official"), official)
    torch.testing.assert_close(key_matching_loss(q, keys, i, "paper"), paper)
    torch.testing.assert_close((1 - c[:, i]).sum(), official)  # the code's expression


def test_gram_schmidt_is_orthonormal_to_the_earlier_span():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(5, 12, generator=g)  # trained components: not orthogonal to each other
    new = gram_schmidt(torch.randn(4, 12, generator=g), old)
    torch.testing.assert_close(new @ new.t(), torch.eye(4), atol=1e-6, rtol=0)
    Q, _ = torch.linalg.qr(old.t())
    assert (Q.t() @ new.t()).abs().max() < 1e-6
    # no room left: rows stay unit vectors
    full = gram_schmidt(torch.randn(3, 12, generator=g), torch.randn(11, 12, generator=g))
    torch.testing.assert_close(full.norm(dim=1), torch.ones(3))


def test_query_memo_reuses_test_queries_and_never_training_ones(tiny_vit):
    class Counting(torch.nn.Module):  # the real tiny ViT, counting its forwards
        def __init__(self):
            super().__init__()
            self.vit, self.calls = tiny_vit, 0

        def features(self, x):
            self.calls += 1
            return self.vit(x)

    bb, m = Counting().eval(), CodaPrompts(CodaPromptConfig(pool=4, length=2, blocks=[0]), 2, {0: 48}, 48)
    g = torch.Generator().manual_seed(0)
    x, other = torch.randn(4, 3, 32, 32, generator=g), torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        direct = tiny_vit(torch.cat([x, other]))
        q = m.query(bb, x)
        assert bb.calls == 1 and torch.equal(q, direct[:4])
        assert torch.equal(m.query(bb, x), q) and bb.calls == 1  # held: no second forward
        assert torch.equal(m.query(bb, x[[2, 0]]), q[[2, 0]]) and bb.calls == 1  # per image, any order
        mixed = m.query(bb, torch.cat([x[:1], other]))  # one image not held: the batch is computed
        assert bb.calls == 2
        torch.testing.assert_close(mixed, direct[[0, 4]])
        bb.train()
        m.query(bb, x)  # training mode (dropout, augmentation): never from the memo
        assert bb.calls == 3
        bb.eval()
        memo, m.memo = m.memo, QueryMemo(0)  # a cold evaluation (the bench's): computed, and not kept
        assert torch.equal(m.query(bb, x), q) and bb.calls == 4
        m.query(bb, x)
        assert bb.calls == 5
        m.memo = memo
        assert torch.equal(m.query(bb, x), q) and bb.calls == 5  # the entries held before are still there
    m.query(bb, x)  # autograd on: a training step
    assert bb.calls == 6


def test_coda_new_components_orthonormal_and_earlier_frozen():
    torch.manual_seed(0)
    c = CodaComponents(n_tasks=3, per_task=4, length=2, dim=8, key_dim=10)
    c.init_task(0)
    with torch.no_grad():  # training moves task 0's components off their orthonormal start
        for X in (c.P, c.K, c.A):
            X[0].add_(0.3 * torch.randn_like(X[0]))
    c.init_task(1)
    for X in (c.P, c.K, c.A):
        new, old = X[1].detach().flatten(1), X[0].detach().flatten(1)
        torch.testing.assert_close(new @ new.t(), torch.eye(4), atol=1e-5, rtol=0)
        assert (new @ old.t()).abs().max() < 1e-5

    cfg = CodaPromptConfig(pool=8, length=2, blocks=[0])
    m = CodaPrompts(cfg, n_tasks=2, dims={0: 8}, key_dim=10)
    m.begin(0)
    m.begin(1)
    prefixes, loss = m.prefixes(torch.randn(3, 10))
    assert loss is None  # orthogonality weight 0 by default
    (prefixes[0].keys.sum() + prefixes[0].values.square().sum()).backward()
    comp = m.components[0]
    for X in (comp.P, comp.K, comp.A):
        assert X[0].grad is None and X[1].grad is not None and X[1].grad.abs().sum() > 0
    assert {id(p) for p in m.trainable()} == {id(X[1]) for X in (comp.P, comp.K, comp.A)}


def _runner(tmp_path, method, sets):
    cfg = load_config(preset="cifar100-mini", method=method,
                      sets=smoke_sets(**{"benchmark.num_tasks": 2, "eval.max_per_task": 20}) + sets)
    return Runner(cfg, tmp_path / method, progress=False, log=lambda *a, **k: None)


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("method", METHODS)
def test_tiny_run_trains_prompts_and_leaves_the_backbone(tmp_path, method):
    r = _runner(tmp_path, method, [])
    before = digests(r.model.backbone)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        f0 = r.model.features(x)
    res = r.run()
    assert res["status"] == "complete" and all(v is not None for v in res["acc_matrix"][1])
    assert digests(r.model.backbone) == before, "the backbone's weights changed"
    prompts = r.model.prompts
    assert prompts.task == len(r.scenario) - 1 and not prompts.learning
    with torch.no_grad():
        torch.testing.assert_close(prompts.query(r.model.backbone, x), f0)  # the query is the untouched model
        assert not torch.equal(r.model.features(x), f0)  # the prompts act
    n = res["cost"]["trainable_params_per_task"]
    assert n[0] > 50 * 128 and n[0] == n[1]  # the head chunk and the task's prompts
    # the query forward is part of every step's cost: more than a linear probe's forward + head backward
    assert res["cost"]["train_flops_per_task"][0] > 0


@pytest.mark.slow
@pytest.mark.shared
def test_dualprompt_trains_its_task_prompt_and_picks_top1_at_test(tmp_path):
    r = _runner(tmp_path, "dualprompt", [])
    r.method.setup()
    p = r.model.prompts
    p.begin(1)
    q = torch.randn(4, p.e_keys[0][0].shape[0])
    with torch.no_grad():
        for k in p.e_keys[0]:
            k.copy_(torch.randn_like(k))
        p.e_keys[0][1].copy_(q[0])
        train, _ = p.prefixes(q)
        p.end()
        test, _ = p.prefixes(q)
    e = p.e[0]
    torch.testing.assert_close(train[2].keys, split_prefix(e[1].expand(4, -1, -1)).keys)
    assert torch.equal(test[2].keys[0], split_prefix(e[1][None]).keys[0])  # sample 0's query is key 1


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("method,sets", [("l2p", ["method.pool=6"]),
                                         ("dualprompt", ["method.g_blocks=[0]", "method.e_blocks=[1]"]),
                                         ("coda-prompt", ["method.blocks=[0, 1]", "method.pool=10"])])
def test_clip_image_encoder_prompted_text_head(tmp_path, method, sets):
    clip = TINY_CLIP
    cfg = load_config(preset="mini-mtil", method=method, sets=smoke_sets(**{"eval.max_per_task": 10,
                                                                            "train.max_steps_per_epoch": 2}) + clip + sets)
    r = Runner(cfg, tmp_path, progress=False, log=lambda *a, **k: None)
    for t in r.scenario.tasks:
        t.train = t.train.subset(np.arange(0, len(t.train), max(len(t.train) // 32, 1))[:32])
    before = digests(r.model.backbone)
    res = r.run()
    assert res["status"] == "complete" and digests(r.model.backbone) == before
    assert res["acc_before"] is not None  # the zero-shot row: the untouched CLIP
    assert res["cost"]["trainable_params_per_task"][0] > 0


@pytest.mark.slow
@pytest.mark.shared
def test_resume_is_exact(tmp_path):
    sets = smoke_sets(**{"benchmark.num_tasks": 2, "train.max_steps_per_epoch": 3, "train.epochs": 2,
                         "train.checkpoint_every": 2, "data.batch_size": 8, "eval.max_per_task": 20})
    def run(name, *extra):
        args = ["run", "--preset", "cifar100-mini", "--method", "coda-prompt", "--out", str(tmp_path / name)]
        for s in sets:
            args += ["--set", s]
        return main(args + list(extra))

    assert run("full") == 0
    with interrupted_at_step_checkpoint(4):  # second step checkpoint of task 1
        assert run("part") == 130
    assert run("part", "--resume") == 0
    import json

    a, b = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("full", "part"))
    assert a["acc_matrix"] == b["acc_matrix"] and a["metrics"] == b["metrics"]
    ka = load(tmp_path / "full" / "checkpoints" / "task_01.pt")["model"]
    kb = load(tmp_path / "part" / "checkpoints" / "task_01.pt")["model"]
    assert any(k.startswith("owned.prompts.") for k in ka)
    assert set(ka) == set(kb) and all(torch.equal(ka[k], kb[k]) for k in ka)


@pytest.mark.parametrize("method,schedule", [("l2p", "constant"), ("dualprompt", "inflora-cosine"),
                                             ("coda-prompt", "inflora-cosine")])
def test_paper_presets_are_the_inflora_protocols_with_the_prompt_optimiser(method, schedule):
    for protocol, epochs in (("cifar100", 20), ("imagenet-r-5", 50), ("imagenet-r-10", 50), ("imagenet-r-20", 50),
                             ("domainnet", 5)):
        c, base = load_config(preset=f"{method}-{protocol}"), load_config(preset=f"inflora-{protocol}")
        assert c.method_name == method and c.method == load_config(preset="cifar100-mini", method=method).method
        assert (c.benchmark, c.backbone, c.data) == (base.benchmark, base.backbone, base.data)
        o = c.train.optimizer
        assert (o.name, o.lr, o.betas, o.weight_decay, o.head_lr) == ("adam", 1e-3, (0.9, 0.999), 0.0, None)
        assert c.train.schedule.name == schedule and c.train.epochs == epochs and c.data.batch_size == 128
        assert c.train.loss_scope == "task" and c.head.kind == "linear"


@pytest.mark.slow
@pytest.mark.shared
def test_l2p_prompt_tuning_prepends_tokens_at_the_input(tmp_path, monkeypatch):
    r = _runner(tmp_path, "l2p", ["method.tuning=prompt", "method.length=5"])
    r.method.setup()
    r.method.begin_task(r.scenario.tasks[0])
    seen = _spy_sdpa(monkeypatch)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        f = r.model.features(x)
    n = 1 + (32 // 4) ** 2  # CLS + patches of the fixture
    blocks = len(r.model.backbone.model.blocks)
    assert [s[2][2] for s in seen] == [n] * blocks + [n + 5 * 5] * blocks  # the query forward, then N x L more
    assert f.shape == (2, 128) and r.model.prompts.aux_loss is not None


@pytest.mark.parametrize("family", ["timm", "open_clip"])
def test_residual_prefix_attends_with_its_own_softmax(family, tiny_vit, tiny_clip):
    """DIKI's mode: the prefix is attended on its own, softmax(q pk^T / sqrt d) pv, scaled per sample and added to
    the block's attention before the out-projection; zero values, or a zero weight, change nothing."""
    torch.manual_seed(0)
    if family == "timm":
        attn, C, H = patch_attention(tiny_vit.blocks[0].attn), 48, 3
        call = lambda x: attn(x)  # noqa: E731
        qkv = lambda x: attn.qkv(x).chunk(3, -1)  # noqa: E731
        proj = attn.proj
    else:
        attn, C = prefix_slots(tiny_clip, [0])[0], 64
        H = attn.num_heads
        call = lambda x: attn(x, x, x, need_weights=False)[0]  # noqa: E731
        qkv = lambda x: F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)  # noqa: E731
        proj = attn.out_proj
    x = torch.randn(2, 5, C)
    pk, pv = torch.randn(2, 4, C), torch.randn(2, 4, C)
    with torch.no_grad():
        y0 = call(x)
        with prefixed({0: attn}, {0: Prefix(pk, torch.zeros_like(pv), "residual")}):
            torch.testing.assert_close(call(x), y0)  # zero values: nothing changes
        with prefixed({0: attn}, {0: Prefix(pk, pv, "residual", weight=torch.zeros(2))}):
            torch.testing.assert_close(call(x), y0)  # an unselected prompt: nothing changes
        w = torch.tensor([0.5, 2.0])
        with prefixed({0: attn}, {0: Prefix(pk, pv, "residual", weight=w)}):
            y = call(x)
        q, k, v = qkv(x)
        D = C // H
        split = lambda t: t.reshape(2, -1, H, D).transpose(1, 2)  # noqa: E731
        own = (split(q) @ split(pk).transpose(-2, -1) * D ** -0.5).softmax(-1) @ split(pv)
        blocks = (split(q) @ split(k).transpose(-2, -1) * D ** -0.5).softmax(-1) @ split(v)
        hand = (blocks + w.view(2, 1, 1, 1) * own).transpose(1, 2).reshape(2, 5, C)
        torch.testing.assert_close(y, proj(hand), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown prefix mode"):
        Prefix(pk, pv, "sideways")
