"""CLIP's text head: class-name embeddings are cached and recomputed exactly when the text encoder changed."""

import torch

from loracl.models.heads import TextHead, prompt_embeddings


def _one_by_one(head, ids):
    """The embeddings computed for each class alone (the head batches every class into one forward)."""
    return torch.cat([prompt_embeddings(head.backbone, [head.prompts[i]]) for i in ids])


def _counting(head):
    calls = []
    orig = head.encode_batched

    def spy(ids):
        calls.append(list(ids))
        return orig(ids)

    head.encode_batched = spy
    return calls


def test_text_cache_follows_the_text_encoder(tiny_clip):
    head = TextHead(tiny_clip)
    head.add_classes([0, 1, 2], ["cat", "dog", "ship"], ["a photo of a {c}."])
    head.add_classes([3, 4], ["zero", "one"], ['a photo of the number: "{c}".'])
    calls = _counting(head)
    ids = torch.tensor([2, 0])
    with torch.no_grad():
        e0 = head.text_embeddings(ids)
        assert len(calls) == 1
        torch.testing.assert_close(head.text_embeddings(torch.tensor([0, 4])), _one_by_one(head, [0, 4]))
        assert len(calls) == 1, "unchanged text encoder: the cache is reused, for any known classes"
        tiny_clip.model.visual.transformer.resblocks[0].attn.in_proj_weight.add_(0.5)
        head.text_embeddings(ids)
        assert len(calls) == 1, "the image encoder is not part of the key"
        w = tiny_clip.model.transformer.resblocks[1].mlp.c_fc.weight
        w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        e1 = head.text_embeddings(ids)
        assert len(calls) == 2 and (e1 - e0).abs().max() > 1e-4
        torch.testing.assert_close(e1, _one_by_one(head, [2, 0]))
        tiny_clip.model.ln_final.weight.mul_(1.1)  # a non-block text tensor
        head.text_embeddings(ids)
        assert len(calls) == 3
    # a LoRA branch on the text encoder (new tensors), and switching branches off, both invalidate it
    ad = tiny_clip.inject_lora(["q", "v"], encoders=["text"])
    with torch.no_grad():
        head.text_embeddings(ids)
        n = len(calls)
        site = ad.sites[0]
        site.add_lora(torch.randn(2, site.d_in), torch.randn(site.d_out, 2), tag="task0")
        e2 = head.text_embeddings(ids)
        assert len(calls) == n + 1
        with ad.inactive():
            e3 = head.text_embeddings(ids)
        assert len(calls) == n + 2 and (e2 - e3).abs().max() > 1e-5
        head.text_embeddings(ids)
        assert len(calls) == n + 3
        site.merge("task0")  # same function, but the weight changed in place: recomputed, same values
        torch.testing.assert_close(head.text_embeddings(ids), e2, atol=1e-5, rtol=1e-5)
        assert len(calls) == n + 4


def test_text_embeddings_carry_gradients_while_the_text_encoder_trains(tiny_clip):
    head = TextHead(tiny_clip)
    head.add_classes([0, 1], ["cat", "dog"])
    calls = _counting(head)
    w = tiny_clip.model.transformer.resblocks[0].attn.out_proj.weight
    w.requires_grad_(True)
    e = head.text_embeddings(torch.tensor([0, 1]))
    e.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    head.text_embeddings(torch.tensor([0, 1]))
    assert len(calls) == 2, "with gradients on, every call encodes (no stale graph from a cache)"
