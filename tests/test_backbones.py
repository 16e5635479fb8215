"""Backbones: the fixture ViT from a local file, its pretrained head, and clear errors for missing weights."""

import time

import pytest
import torch

from loracl.config import BackboneConfig
from loracl.runs.assembly import load_config
from loracl.errors import WeightsError
from loracl.models.backbones import create_backbone

FIXTURE_KW = dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0, num_classes=200)


@pytest.mark.shared
def test_fixture_from_file_keeps_pretrained_head():
    cfg = load_config(preset="cifar100-mini").backbone
    bb = create_backbone(cfg, keep_pretrained_head=True)
    assert bb.feature_dim == 128 and bb.pretrained_head.out_features == 200
    assert bb.data_config()["size"] == 32
    assert not any(p.requires_grad for p in bb.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert bb.features(x).shape == (2, 128)
    # the file's weights were loaded: a second build from the same file gives identical features
    bb2 = create_backbone(cfg)
    torch.testing.assert_close(bb2.features(x), bb.features(x))
    assert {"q", "k", "v", "out", "fc1", "fc2"} <= set(bb.block_projections(bb.encoder_blocks()["image"][0]))


def test_missing_local_file_is_named(tmp_path):
    cfg = BackboneConfig(name="vit_tiny_patch16_224", file=str(tmp_path / "nope.safetensors"), kwargs=FIXTURE_KW)
    with pytest.raises(WeightsError, match=r"nope\.safetensors"):
        create_backbone(cfg)


def test_offline_hub_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(WeightsError) as e:
        create_backbone(BackboneConfig(name="vit_tiny_patch16_224.augreg_in21k", pretrained=True))
    msg = str(e.value)
    assert "not reachable" in msg and "backbone.file" in msg and "hub cache" in msg
    assert time.time() - t < 20
    with pytest.raises(WeightsError, match="pretrained tag"):
        create_backbone(BackboneConfig(kind="open_clip", name="ViT-B-16", pretrained=True))
    with pytest.raises(WeightsError, match="openai"):
        create_backbone(BackboneConfig(kind="open_clip", name="ViT-B-16", pretrained="openai"))


def test_unknown_model_name():
    with pytest.raises(WeightsError, match="no model named"):
        create_backbone(BackboneConfig(name="vit_does_not_exist", pretrained=False))


def test_tiny_clip_both_encoders(tiny_clip):
    blocks = tiny_clip.encoder_blocks()
    assert set(blocks) == {"image", "text"} and len(blocks["text"]) == 2
    tok = tiny_clip.tokenize(["a photo of a dog"])
    assert tiny_clip.encode_text(tok).shape == (1, 32)
    assert tiny_clip.features(torch.randn(1, 3, 32, 32)).shape == (1, 32)
