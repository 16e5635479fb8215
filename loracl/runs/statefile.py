"""Checkpoints written atomically, holding only what differs from the pretrained backbone.

A per-task checkpoint of a ViT-B run would be 350 MB if it held every weight; most weights never change,
so only tensors whose bytes differ from the freshly built model's (merged weights, heads, branches) are
stored. Loading rebuilds the model from the config, then loads this subset on top.

The file is one safetensors file: the tensors, plus the rest of the state as a JSON tree in its metadata,
where each tensor is a `{"__tensor__": key}` reference. Nothing is unpickled, so a checkpoint planted in a
run folder cannot run code on --resume. Values JSON lacks are tagged: tuples, dicts whose keys are not all
strings (optimizer state is keyed by int), numpy arrays, non-finite floats.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from .files import WriteError, write_file

FORMAT = "loracl-checkpoint"
VERSION = "1"


def tensor_digest(t: torch.Tensor) -> str:
    # reshape(-1): a 0-dim tensor (CLIP's logit_scale) cannot be viewed as bytes directly
    b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(b, digest_size=16).hexdigest()


def digests(module: torch.nn.Module) -> dict[str, str]:
    return {k: tensor_digest(v) for k, v in module.state_dict().items()}


def changed_state(module: torch.nn.Module, base: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in module.state_dict().items():
        if k not in base or tensor_digest(v) != base[k]:
            out[k] = v.detach().cpu().clone()
    return out


# ------------------------------------------------------------------------------------------------
# the tree <-> JSON + tensors


def _encode(x, tensors: dict, seen: set, where: str):
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else {"__float__": repr(x)}  # 'nan', 'inf', '-inf'
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        # safetensors refuses two tensors over one storage (views, tied weights): copy the later ones
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        key = f"t{len(tensors)}"
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"checkpoint: object array at {where or 'top level'} cannot be stored")
        ref = _encode(torch.from_numpy(np.ascontiguousarray(x)), tensors, seen, where)
        return {"__ndarray__": ref["__tensor__"]}
    if isinstance(x, tuple):
        return {"__tuple__": [_encode(v, tensors, seen, f"{where}[{i}]") for i, v in enumerate(x)]}
    if isinstance(x, list):
        return [_encode(v, tensors, seen, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in x):
            return {k: _encode(v, tensors, seen, f"{where}.{k}") for k, v in x.items()}
        return {"__dict__": [[_encode(k, tensors, seen, where), _encode(v, tensors, seen, f"{where}[{k!r}]")]
                             for k, v in x.items()]}
    # a bug, not a user error: a method put something into its state that has no plain form
    raise TypeError(f"checkpoint: cannot store {type(x).__name__} at {where or 'top level'}")


def _decode(x, tensors: dict):
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    if not isinstance(x, dict):
        return x
    if len(x) == 1:
        (tag, v), = x.items()
        if tag == "__tensor__":
            return tensors[v]
        if tag == "__ndarray__":
            return tensors[v].numpy()
        if tag == "__float__":
            return float(v)
        if tag == "__tuple__":
            return tuple(_decode(e, tensors) for e in v)
        if tag == "__dict__":
            return {_hashable(_decode(k, tensors)): _decode(e, tensors) for k, e in v}
    return {k: _decode(v, tensors) for k, v in x.items()}


def _hashable(k):
    return tuple(_hashable(e) for e in k) if isinstance(k, (list, tuple)) else k


def nonfinite(obj, where: str = "") -> list[str]:
    """Where in a state tree floating-point tensors hold NaN or inf: a state to be called good has none."""
    if isinstance(obj, torch.Tensor):
        bad = obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all())
        return [where or "top level"] if bad else []
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in nonfinite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in nonfinite(v, f"{where}[{i}]")]
    return []


# ------------------------------------------------------------------------------------------------
# files


def atomic_save(obj, path: Path, root: Path | None = None) -> None:
    """Write `obj` (nested dicts / lists / tuples of tensors, arrays, numbers, strings, None) to `path`: a fresh
    temporary file, then one rename (`files.write_file`), so a crash or a full disk leaves the previous file as
    it was; `root`: the run folder the file must stay in."""
    from safetensors.torch import save

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors, set(), "")
    data = save(tensors, metadata={"format": FORMAT, "version": VERSION, "tree": json.dumps(tree)})
    try:
        write_file(path, data, root)
    except WriteError as e:
        raise CheckpointError(f"checkpoint: {e}; the checkpoints already written are unchanged") from None


def load(path: Path):
    """The object `atomic_save` wrote. Never executes anything from the file: an old pickle checkpoint, a
    foreign or truncated file is refused with one error line naming it."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    # safetensors: an 8-byte header length, then the JSON header; torch.save: a zip (PK) or a bare pickle
    # (0x80, which can also be the low byte of a safetensors header length: check for the header first)
    if head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise CheckpointError(f"checkpoint {path} is a pickle file (an older loracl, or not loracl's): refused, "
                          f"since loading a pickle can run code; delete it to start that part again")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a loracl checkpoint (a safetensors file without loracl's "
                                  f"state)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return _decode(json.loads(meta["tree"]), tensors)
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorError, JSON and key errors: the file is damaged or not ours
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a loracl checkpoint ({msg})") from None
