"""Pretrained backbones from timm and open_clip, by name or from a local file, used as they are.

`Backbone` gives every method the same view of either family: image features, the transformer blocks of
each encoder and, per block, the projections LoRA may adapt. CLIP adds the text side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from pathlib import Path

import torch
import torch.nn as nn

from ..config import BackboneConfig
from ..errors import ConfigError, WeightsError
from .attention import attach_mha
from .lora import LoRAAdapter, Site, attach_linear, attach_parallel

# the weights a branch can adapt, and `mlp`: parallel adapters beside each block's MLP (no weight to merge into)
PROJECTION_KINDS = ("q", "k", "v", "out", "fc1", "fc2", "mlp")


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_hub():
    """Let huggingface_hub look only in its local cache, so an offline machine fails at once instead of retrying."""
    import huggingface_hub.constants as hc

    old = hc.HF_HUB_OFFLINE
    hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE = old


def _weights_error(cfg: BackboneConfig, err: Exception, online: bool) -> WeightsError:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except Exception:  # pragma: no cover
        HF_HUB_CACHE = "~/.cache/huggingface/hub"
    how = ("the Hugging Face hub is not reachable from this machine" if not online
           else f"the download failed ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
    tag = f" (tag '{cfg.pretrained}')" if isinstance(cfg.pretrained, str) else ""
    return WeightsError(
        f"pretrained weights for {cfg.kind} model '{cfg.name}'{tag} not found: {how}; looked in the hub cache "
        f"{HF_HUB_CACHE}. Download them once on a machine with internet, or give a local file with "
        f"--set backbone.file=PATH (a .safetensors/.bin/.pth state dict)")


def _file_error(path: Path, err: Exception, what: str) -> WeightsError:
    """A weights file that would not load, as one line: the first key whose shape differs (both shapes), the
    first missing or unexpected key, else the loader's first line (a truncated or foreign file)."""
    text = str(err)
    m = re.search(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                  r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)", text)
    if m:
        return WeightsError(f"{what} weights {path} do not fit the model: '{m[1]}' has shape ({m[2]}) in the file "
                            f"but ({m[3]}) in the model (another architecture? check backbone.name and kwargs)")
    for kind, label in (("Missing", "lacks"), ("Unexpected", "has keys the model does not, e.g.")):
        m = re.search(kind + r' key\(s\) in state_dict: "([^"]+)"', text)
        if m:
            n = len(re.findall(r'"[^"]+"', text.split(kind, 1)[1].split("\n")[0]))
            return WeightsError(f"{what} weights {path} do not fit the model: the file {label} '{m[1]}'"
                                + (f" (and {n - 1} more)" if n > 1 else "") + "; check backbone.name and kwargs")
    first = (text.strip().splitlines() or [type(err).__name__])[0][:200]
    return WeightsError(f"cannot load {what} weights from {path}: truncated, or not a weights file "
                        f"({type(err).__name__}: {first})")


def _check_file(cfg: BackboneConfig) -> Path | None:
    if not cfg.file:
        return None
    path = Path(cfg.file).expanduser()
    if not path.is_file():
        raise WeightsError(f"backbone weights file not found: {path} (from backbone.file)")
    return path


class Backbone(nn.Module):
    """A pretrained ViT (timm) or CLIP (open_clip) used as a frozen feature extractor plus hooks for LoRA."""

    family: str

    def __init__(self):
        super().__init__()
        self.pretrained_head: nn.Linear | None = None

    # ---- to implement per family
    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encoder_blocks(self) -> dict[str, list[nn.Module]]:
        raise NotImplementedError

    def block_projections(self, block: nn.Module) -> dict[str, tuple[nn.Module, str, tuple[int, int]]]:
        raise NotImplementedError

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    def data_config(self) -> dict:
        raise NotImplementedError

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Every weight of the encoders (what full fine-tuning trains): not the LoRA branches, not the pretrained
        head kept for retention, not CLIP's temperature (it stays the pretrained constant)."""
        return [p for n, p in self.model.named_parameters()
                if ".lora" not in n and n.split(".")[-1] not in ("logit_scale", "logit_bias")]

    # ---- shared
    def inject_lora(self, kinds: list[str], blocks: list[int] | None = None,
                    encoders: list[str] | None = None) -> LoRAAdapter:
        """Attach LoRA layers to the chosen projections; returns the adapter with one site per projection."""
        bad = set(kinds) - set(PROJECTION_KINDS)
        if bad:
            raise ConfigError(f"unknown LoRA target(s) {sorted(bad)} in method.targets; choose from "
                              f"{', '.join(PROJECTION_KINDS)}")
        all_blocks = self.encoder_blocks()
        encoders = encoders or list(all_blocks)
        specs = []
        for enc in encoders:
            if enc not in all_blocks:
                raise ConfigError(f"method.encoders: the backbone has no encoder '{enc}' (it has "
                                  f"{', '.join(all_blocks)})")
            idx = range(len(all_blocks[enc])) if blocks is None else blocks
            for b in idx:
                if not 0 <= b < len(all_blocks[enc]):
                    raise ConfigError(f"method.blocks: block {b} is out of range for encoder '{enc}' "
                                      f"({len(all_blocks[enc])} blocks)")
                projections = self.block_projections(all_blocks[enc][b])
                for kind in kinds:
                    host, wname, rows = projections[kind]
                    specs.append((enc, b, kind, host, wname, rows))
        return LoRAAdapter(build_sites(specs))


def build_sites(projections) -> list[Site]:
    """Sites from (encoder, block, kind, host module, weight name, rows) tuples: a Linear gets a hooked layer,
    nn.MultiheadAttention's fused in-projection its patched forward, a weightless host (None) parallel adapters."""
    sites = []
    for encoder, block, kind, host, weight_name, rows in projections:
        if weight_name is None:
            layer = attach_parallel(host, rows[0], rows[1])
            sites.append(Site(encoder, block, kind, layer, "mlp"))
            continue
        if isinstance(host, nn.MultiheadAttention):
            layer = attach_mha(host, {kind: rows})
        elif isinstance(host, nn.Linear):
            layer = attach_linear(host, {kind: rows})
        else:
            raise TypeError(f"cannot attach LoRA to {type(host).__name__}")
        sites.append(Site(encoder, block, kind, layer, kind))
    return sites


class TimmViT(Backbone):
    family = "timm"

    def __init__(self, cfg: BackboneConfig, keep_pretrained_head: bool = False):
        super().__init__()
        import timm

        path = _check_file(cfg)
        overlay = dict(cfg.cfg_overlay)
        if path is not None:
            overlay["file"] = str(path)
        pretrained = bool(cfg.pretrained) or path is not None
        online = True if (path is not None or not pretrained) else hub_reachable()
        try:
            with (contextlib.nullcontext() if online else _offline_hub()):
                model = timm.create_model(cfg.name, pretrained=pretrained,
                                          pretrained_cfg_overlay=overlay or None, **cfg.kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise WeightsError(f"timm has no model named '{cfg.name}' (backbone.name)") from None
            if path is not None:
                raise _file_error(path, e, "backbone") from None
            raise _weights_error(cfg, e, online) from None
        except (OSError, ValueError) as e:
            if path is not None:
                raise _file_error(path, e, "backbone") from None
            raise _weights_error(cfg, e, online) from None
        except Exception as e:  # safetensors' and pickle's own errors on a truncated or foreign file
            if path is None:
                raise
            raise _file_error(path, e, "backbone") from None
        if not hasattr(model, "blocks"):
            raise WeightsError(f"timm model '{cfg.name}' is not a ViT with .blocks; loracl adapts ViT-style models")
        head = model.get_classifier()
        if keep_pretrained_head and isinstance(head, nn.Linear) and head.out_features > 0:
            self.pretrained_head = head
            for p in head.parameters():
                p.requires_grad_(False)
        model.reset_classifier(0)
        self.model = model

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    @property
    def feature_dim(self) -> int:
        return self.model.num_features

    def encoder_blocks(self):
        return {"image": list(self.model.blocks)}

    def block_projections(self, block):
        attn, mlp = block.attn, block.mlp
        out = {}
        if hasattr(attn, "qkv") and isinstance(attn.qkv, nn.Linear):
            d = attn.qkv.out_features // 3
            out.update(q=(attn.qkv, "weight", (0, d)), k=(attn.qkv, "weight", (d, 2 * d)),
                       v=(attn.qkv, "weight", (2 * d, 3 * d)))
        else:  # separate q/k/v projections (EVA-style)
            for kind, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
                lin = getattr(attn, name)
                out[kind] = (lin, "weight", (0, lin.out_features))
        out["out"] = (attn.proj, "weight", (0, attn.proj.out_features))
        out["fc1"] = (mlp.fc1, "weight", (0, mlp.fc1.out_features))
        out["fc2"] = (mlp.fc2, "weight", (0, mlp.fc2.out_features))
        out["mlp"] = (mlp, None, (mlp.fc1.in_features, mlp.fc2.out_features))  # (d_in, d_out) of the MLP
        return out

    def data_config(self) -> dict:
        import timm.data

        c = timm.data.resolve_data_config({}, model=self.model)
        return {"size": int(c["input_size"][-1]), "mean": tuple(c["mean"]), "std": tuple(c["std"]),
                "interpolation": c.get("interpolation", "bicubic"), "crop_pct": float(c.get("crop_pct", 0.875))}


# open_clip configs of tiny CLIPs for tests and smoke runs (random weights; no download)
TINY_CLIP_CONFIGS = {
    "loracl-tiny-clip": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 48, "heads": 3, "layers": 2},
    }
}


def _register_tiny_clip():
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    for name, c in TINY_CLIP_CONFIGS.items():
        _MODEL_CONFIGS.setdefault(name, c)
    return open_clip


class OpenCLIP(Backbone):
    family = "open_clip"

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        open_clip = _register_tiny_clip()
        path = _check_file(cfg)
        if path is not None and (path.parent / f"{cfg.name}.json").is_file():
            # a custom model (assets/clip-tin32) ships its open_clip config beside its weights
            open_clip.add_model_config(path.parent / f"{cfg.name}.json")
        tag = str(path) if path is not None else (cfg.pretrained if isinstance(cfg.pretrained, str) else None)
        if cfg.pretrained is True and path is None:
            raise WeightsError(f"open_clip model '{cfg.name}' needs a pretrained tag (e.g. backbone.pretrained: "
                               f"openai) or backbone.file; set backbone.pretrained: false for random weights")
        online = True if (path is not None or tag is None) else hub_reachable()
        log = logging.getLogger()
        level = log.level
        log.setLevel(logging.CRITICAL)  # open_clip logs its own download errors and random-init warnings
        try:
            with (contextlib.nullcontext() if online else _offline_hub()):
                model = open_clip.create_model(cfg.name, pretrained=tag, **cfg.kwargs)
        except RuntimeError as e:
            if "not found" in str(e) and "Model config" in str(e):
                raise WeightsError(f"open_clip has no model named '{cfg.name}' (backbone.name)") from None
            if path is not None:
                raise _file_error(path, e, "CLIP") from None
            raise _weights_error(cfg, e, online) from None
        except (OSError, ValueError) as e:
            if path is not None:
                raise _file_error(path, e, "CLIP") from None
            raise _weights_error(cfg, e, online) from None
        except Exception as e:  # safetensors' and pickle's own errors on a truncated or foreign file
            if path is None:
                raise
            raise _file_error(path, e, "CLIP") from None
        finally:
            log.setLevel(level)
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(cfg.name)

    def features(self, x):
        return self.model.encode_image(x)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def feature_dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if self.model.text_projection is not None else \
            self.model.visual.output_dim

    def text_parameters(self) -> list[nn.Parameter]:
        m = self.model
        mods = [m.transformer, m.token_embedding, m.ln_final]
        params = [p for mod in mods for p in mod.parameters()]
        params += [m.positional_embedding] + ([m.text_projection] if isinstance(m.text_projection, nn.Parameter) else [])
        return params

    def encoder_blocks(self):
        return {"image": list(self.model.visual.transformer.resblocks), "text": list(self.model.transformer.resblocks)}

    def block_projections(self, block):
        attn, mlp = block.attn, block.mlp
        d = attn.embed_dim
        return {"q": (attn, "in_proj_weight", (0, d)), "k": (attn, "in_proj_weight", (d, 2 * d)),
                "v": (attn, "in_proj_weight", (2 * d, 3 * d)),
                "out": (attn.out_proj, "weight", (0, d)),
                "fc1": (mlp.c_fc, "weight", (0, mlp.c_fc.out_features)),
                "fc2": (mlp.c_proj, "weight", (0, mlp.c_proj.out_features)),
                "mlp": (mlp, None, (mlp.c_fc.in_features, mlp.c_proj.out_features))}

    def data_config(self) -> dict:
        pc = dict(getattr(self.model.visual, "preprocess_cfg", {}) or {})
        size = pc.get("size", self.model.visual.image_size)
        size = size[-1] if isinstance(size, (tuple, list)) else size
        return {"size": int(size), "mean": tuple(pc.get("mean", (0.48145466, 0.4578275, 0.40821073))),
                "std": tuple(pc.get("std", (0.26862954, 0.26130258, 0.27577711))),
                "interpolation": pc.get("interpolation", "bicubic"), "crop_pct": 1.0}


def create_backbone(cfg: BackboneConfig, keep_pretrained_head: bool = False) -> Backbone:
    if cfg.kind == "timm":
        bb = TimmViT(cfg, keep_pretrained_head)
    else:
        bb = OpenCLIP(cfg)
    for p in bb.parameters():
        p.requires_grad_(False)
    return bb
