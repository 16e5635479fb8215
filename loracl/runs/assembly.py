"""The assembly room: a run config from a preset or a file, with its method resolved once.

A run config is YAML: a preset from `loracl/presets/` or a user file. Presets may `extends:` another preset
(deep merge) and carry per-method `overrides:` that apply when that method is selected. Paths may use
`{data_root}`, `{weights_root}` and `{assets}`, resolved at load time (see `resolve_roots`). The `method:`
section is validated once into the method's own Config (a named configuration such as `inflora-ca` brings its
settings and run defaults, e.g. alignment on, unless the config says otherwise). Unknown keys, wrong types and
missing fields are one error line naming the key and the file.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..config import MethodConfig, RunConfig
from ..errors import ConfigError
from ..methods import lookup

PACKAGE_DIR = Path(__file__).resolve().parent.parent
PRESET_DIR = PACKAGE_DIR / "presets"
REPO_DIR = PACKAGE_DIR.parent



def list_presets() -> dict[str, str]:
    out = {}
    for p in sorted(PRESET_DIR.glob("*.yaml")):
        if p.stem.startswith("_"):
            continue
        doc = _read_yaml(p)
        out[p.stem] = str(doc.get("description", "")).strip().split("\n")[0]
    return out


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text (a YAML file is expected)") from None
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return doc


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not v.get("_replace", False):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy({kk: vv for kk, vv in v.items() if kk != "_replace"} if isinstance(v, dict) else v)
    return out


def load_doc(path: Path, seen: tuple = ()) -> dict:
    doc = _read_yaml(path)
    parent = doc.pop("extends", None)
    if parent is not None:
        ppath = preset_path(parent) if not str(parent).endswith((".yaml", ".yml")) else path.parent / parent
        if ppath in seen:
            raise ConfigError(f"{path}: 'extends' cycle through {ppath}")
        base = load_doc(ppath, seen + (path,))
        # overrides of the child are merged per method, not replaced
        doc = deep_merge(base, doc)
    return doc


def preset_path(name: str) -> Path:
    p = PRESET_DIR / f"{name}.yaml"
    if not p.exists():
        known = ", ".join(list_presets())
        raise ConfigError(f"unknown preset '{name}' (known: {known})")
    return p


def parse_set(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    if key.count(".") >= 16:  # no config section is nested that deep; deeper keys only exhaust the recursion
        raise ConfigError(f"--set {key[:60]}...: a key of {key.count('.') + 1} levels; config keys have at most 16")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _set_path(doc: dict, keys: list[str], value: Any) -> None:
    cur = doc
    for k in keys[:-1]:
        if not isinstance(cur.get(k), dict):
            cur[k] = {}
        cur = cur[k]
    cur[keys[-1]] = value


def default_roots() -> dict[str, Path | None]:
    """Where data, weights and the embedded demo bundle are looked for when the config does not say."""
    def first(env: str, *candidates: Path) -> Path | None:
        if os.environ.get(env):
            return Path(os.environ[env]).expanduser().absolute()
        for c in candidates:
            if c.exists():
                return c.resolve()
        return None

    cwd = Path.cwd()
    return {
        "data_root": first("LORACL_DATA_ROOT", cwd / "../shared/data", REPO_DIR / "../shared/data"),
        "weights_root": first("LORACL_WEIGHTS_ROOT", cwd / "../shared/weights", REPO_DIR / "../shared/weights"),
        "assets": first("LORACL_ASSETS", REPO_DIR / "assets"),
    }


def resolve_roots(doc: dict) -> dict:
    roots = default_roots()
    for key in ("data_root", "weights_root"):
        if doc.get(key):
            roots[key] = Path(str(doc[key])).expanduser().absolute()  # the saved config works from any folder
        doc[key] = str(roots[key]) if roots[key] is not None else None

    def sub(x):
        if isinstance(x, str) and "{" in x:
            for key, val in roots.items():
                token = "{" + key + "}"
                if token in x:
                    if val is None:
                        env = {"data_root": "LORACL_DATA_ROOT", "weights_root": "LORACL_WEIGHTS_ROOT",
                               "assets": "LORACL_ASSETS"}[key]
                        raise ConfigError(
                            f"path '{x}' needs {token}, which is not set: pass --set {key}=DIR or set {env}")
                    x = x.replace(token, str(val))
            return x
        if isinstance(x, dict):
            return {k: sub(v) for k, v in x.items()}
        if isinstance(x, list):
            return [sub(v) for v in x]
        return x

    return sub(doc)


def format_validation_error(err: ValidationError, source: str, prefix: str = "") -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith("function-"))
        loc = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"'{loc}': {msg}")
    return f"config error in {source}: " + "; ".join(parts)


def load_config(*args, **kwargs) -> RunConfig:
    """Build the run config from a preset or a file, then --method, --seed, --out and --set overrides."""
    try:
        return _load_config(*args, **kwargs)
    except RecursionError:  # a value nested thousands deep (a --set or a file): no config is
        raise ConfigError("config error: a value is nested too deeply to be a config value") from None


def _load_config(
    source: str | Path | None = None,
    *,
    preset: str | None = None,
    method: str | None = None,
    seed: int | None = None,
    out: str | None = None,
    sets: list[str] = (),
) -> RunConfig:
    if (source is None) == (preset is None):
        raise ConfigError("give either a config file or --preset NAME")
    path = preset_path(preset) if preset else Path(source)
    src = str(path) + (f" (with --set {' '.join(sets)})" if sets else "")
    doc = load_doc(path)
    overrides = doc.pop("overrides", {}) or {}
    if doc.get("method") is not None and not isinstance(doc["method"], dict):
        raise ConfigError(f"config error in {src}: 'method': a mapping with a name is expected "
                          f"(got {doc['method']!r})")
    if method is not None and method != (doc.get("method") or {}).get("name"):
        doc["method"] = {"name": method}
    name = str((doc.get("method") or {}).get("name", "seq-lora"))
    if name in overrides:
        doc = deep_merge(doc, overrides[name])
    # the defaults a method (or a named configuration of one) declares for the run, unless the config sets them
    _set_defaults(doc, lookup(name, src).run)
    if seed is not None:
        doc["seed"] = seed
    if out is not None:
        doc["out"] = out
    for item in sets:
        keys, value = parse_set(item)
        _set_path(doc, keys, value)
    if preset and "name" not in doc:
        doc["name"] = preset
    doc = resolve_roots(doc)
    section = doc.get("method") if doc.get("method") is not None else {"name": "seq-lora"}
    if not isinstance(section, dict):
        raise ConfigError(f"config error in {src}: 'method': a mapping with a name is expected (got {section!r})")
    doc["method"] = resolve_method(section, src)
    try:
        return RunConfig.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, src)) from None


def resolve_method(section: dict, source: str) -> MethodConfig:
    """The `method:` section validated into its method's Config, a named configuration's settings first."""
    name = str(section.get("name", "seq-lora"))
    entry = lookup(name, source)
    given = {k: v for k, v in section.items() if k != "name"}
    try:
        return entry.cls.Config.model_validate({**entry.settings, **given, "name": name})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, prefix="method.")) from None


def _set_defaults(doc: dict, defaults: dict) -> None:
    """Each leaf of `defaults` written into `doc` where `doc` does not set it."""
    for k, v in defaults.items():
        if isinstance(v, dict):
            if doc.get(k) is None:
                doc[k] = {}
            if isinstance(doc[k], dict):
                _set_defaults(doc[k], v)
        else:
            doc.setdefault(k, v)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
