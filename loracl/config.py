"""One typed, validated config per run.

A run config is YAML: a preset from `loracl/presets/` or a user file. Presets may `extends:` another preset
(deep merge) and carry per-method `overrides:` that apply when that method is selected. Paths may use
`{data_root}`, `{weights_root}` and `{assets}`, resolved at load time (see `resolve_roots`).
Unknown keys, wrong types and missing fields are one error line naming the key and the file.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
PRESET_DIR = PACKAGE_DIR / "presets"
REPO_DIR = PACKAGE_DIR.parent


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetSpec(Strict):
    """One dataset: a torchvision dataset by name, or an image folder (optionally with split files)."""

    name: str = Field(description="registry name: imagefolder, cifar100, mnist, imagenet-r, domainnet, pacs, ...")
    root: str
    download: bool = False
    label: str | None = Field(None, description="display name of the task built from this dataset")
    domain: str | None = Field(None, description="domain folder (PACS, DomainNet)")
    split_files: dict[str, str] | None = Field(None, description="{train: file, test: file} listing images")
    holdout: float | None = Field(None, description="seeded stratified test fraction when there is no split")
    holdout_seed: int = 42
    classes: list[str] | list[int] | None = Field(None, description="keep only these classes (names or indices)")
    max_per_class: dict[str, int] | None = Field(None, description="{train: n, test: n}, seeded subsample")
    template: str | None = Field(None, description="CLIP prompt template with {c}; default from the dataset")

    @field_validator("split_files", "max_per_class")
    @classmethod
    def _split_keys(cls, v):
        if v is not None and not set(v) <= {"train", "test"}:
            raise ValueError(f"keys must be 'train' and/or 'test', got {sorted(v)}")
        return v


class BenchmarkConfig(Strict):
    name: str
    scenario: Literal["class-incremental", "domain-incremental", "cross-dataset"]
    datasets: list[DatasetSpec] = Field(min_length=1)
    num_tasks: int | None = Field(None, ge=1, description="class-incremental: equal tasks")
    task_sizes: list[int] | None = Field(None, description="class-incremental: classes per task")
    class_order: Literal["fixed", "seeded"] | list[int] = "fixed"


class BackboneConfig(Strict):
    kind: Literal["timm", "open_clip"] = "timm"
    name: str
    pretrained: bool | str = Field(True, description="timm: bool; open_clip: a pretrained tag such as 'openai'")
    file: str | None = Field(None, description="local weights file used instead of a download")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to create_model")
    cfg_overlay: dict[str, Any] = Field(default_factory=dict, description="timm pretrained_cfg_overlay")
    head_file_key: str | None = Field(None, description="state-dict prefix of the pretrained head (retention)")


class HeadConfig(Strict):
    kind: Literal["linear", "cosine", "text"] = "linear"
    cosine_scale: float = 30.0
    templates: Literal["first", "all"] = "first"


class DataConfig(Strict):
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)
    train_augment: Literal["none", "flip", "crop_flip", "rrc_flip"] = "flip"
    rrc_scale: tuple[float, float] = Field((0.08, 1.0), description="rrc_flip: area fraction range of the crop "
                                                                    "(SD-LoRA's recipe: [0.05, 1])")
    normalize: bool = True
    resize: Literal["backbone", "resize", "resize_crop"] = "backbone"
    stats_augment: bool = Field(True, description="statistics / feature passes see the training transforms "
                                                  "(as InfLoRA's official code) rather than the test ones")
    pipeline: Literal["auto", "pil", "tensor"] = Field(
        "auto", description="pil: decode and augment every image with PIL (the reference); tensor: decode once, "
                            "augment batches on the device; auto: tensor on GPU, pil on CPU")
    cache_dir: str | None = Field(None, description="tensor pipeline: keep decoded datasets here (memory-mapped)")
    host_cache_mb: int = Field(8192, ge=0, description="tensor pipeline: decoded data kept in RAM up to this size")
    device_cache_mb: int = Field(24576, ge=0, description="tensor pipeline: decoded data moved to the GPU up to this size")


class OptimizerConfig(Strict):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(5e-4, gt=0)
    head_lr: float | None = Field(None, gt=0, description="learning rate of the classifier head if different")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9


class ScheduleConfig(Strict):
    name: Literal["constant", "cosine", "cosine-epoch", "inflora-cosine", "onecycle", "step"] = "constant"
    milestones: list[int] = Field(default_factory=list, description="step schedule: epochs")
    gamma: float = 0.1
    warmup_epochs: float = 0.0


class TrainConfig(Strict):
    epochs: int | list[int] = Field(5, description="per task, or a list with one entry per task")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    model_mode: Literal["train", "eval"] = Field("train", description="eval: no dropout while training")
    loss_scope: Literal["task", "seen"] = Field("task", description="cross-entropy over the task's or all seen classes")
    grad_clip: float | None = None
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap for smoke runs")
    checkpoint_every: int = Field(0, ge=0, description="also checkpoint every N steps (0: task boundaries only)")
    nan_policy: Literal["stop", "skip"] = "stop"
    compile: bool = Field(False, description="torch.compile the training forward (recompiles when branches change)")
    ddp_find_unused: bool | None = Field(
        None, description="under torchrun, DDP searches the graph every step for trained parameters without a "
                          "gradient; null: only for methods that do not declare that every step uses them all")

    @field_validator("epochs")
    @classmethod
    def _positive(cls, v):
        vals = v if isinstance(v, list) else [v]
        if any(e < 0 for e in vals):
            raise ValueError("epochs must be >= 0")
        return v


class EvalConfig(Strict):
    every_task: bool = True
    retention: str | None = Field(None, description="image folder of the backbone's pretraining domain")
    retention_classes: str | None = Field(None, description="tsv mapping head index to folder name")
    retention_every_task: bool = Field(False, description="measure retention after every task, not only the last")
    retention_per_class: int | None = Field(None, ge=1, description="cap retention images per class (seeded)")
    max_per_task: int | None = Field(None, ge=1, description="cap test images per task (smoke runs)")
    cache_mb: int = Field(4096, ge=0, description="keep decoded test images (uint8) up to this size in memory")
    ncm: bool = Field(False, description="also score the final backbone with a nearest-class-mean classifier "
                                         "(cosine to class means of the training images): metric final_acc_ncm")


class AlignConfig(Strict):
    """Classifier alignment (SLCA; the official InfLoRA_CA): after every task, re-train all linear heads on
    features sampled from stored per-class Gaussians (loracl/alignment.py; BASELINES.md section 1)."""

    enabled: bool = False
    samples_per_class: int = Field(256, ge=1, description="features drawn per seen class and epoch")
    epochs: int = Field(5, ge=0)
    lr: float = Field(0.01, gt=0, description="SGD, cosine-annealed per epoch")
    momentum: float = 0.9
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(256, ge=1)
    logit_norm: bool = Field(False, description="divide logits by the mean per-task logit norm, then by the "
                                                "temperature (official: every dataset but CIFAR-100)")
    temperature: float = Field(0.1, gt=0)
    shrink: bool = Field(True, description="draw around mean_c * (0.9 + 0.1 (task_of_c + 1) / (t + 1))")


class PublishedRow(Strict):
    """A number a paper printed for this protocol, shown by `loracl compare` beside the measured one."""

    method: str = Field(description="loracl method name (or a method loracl lacks: shown without a measurement)")
    metric: str = Field(description="results.json metrics key: final_acc, avg_inc_acc, transfer, average, last, ...")
    value: float
    std: float | None = None
    source: str = Field(description="paper and table, or where the number was transcribed from")
    when: dict[str, Any] = Field(default_factory=dict, description="dotted config keys a run must have to match")


class RunConfig(Strict):
    name: str = "run"
    description: str = ""
    seed: int = 0
    out: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data_root: str | None = None
    weights_root: str | None = None
    benchmark: BenchmarkConfig
    backbone: BackboneConfig
    head: HeadConfig = Field(default_factory=HeadConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "seq-lora"})
    tensorboard: bool = False
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    published: list[PublishedRow] = Field(default_factory=list, description="the paper's numbers for this protocol")

    def epochs_for(self, task: int) -> int:
        e = self.train.epochs
        if isinstance(e, list):
            if task >= len(e):
                raise ConfigError(f"train.epochs lists {len(e)} entries but the benchmark has task {task}")
            return e[task]
        return e

    @property
    def method_name(self) -> str:
        return str(self.method.get("name", ""))


# --------------------------------------------------------------------------------------------------
# loading


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


def _load_doc(path: Path, seen: tuple = ()) -> dict:
    doc = _read_yaml(path)
    parent = doc.pop("extends", None)
    if parent is not None:
        ppath = preset_path(parent) if not str(parent).endswith((".yaml", ".yml")) else path.parent / parent
        if ppath in seen:
            raise ConfigError(f"{path}: 'extends' cycle through {ppath}")
        base = _load_doc(ppath, seen + (path,))
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


def load_config(
    source: str | Path | None = None,
    *,
    preset: str | None = None,
    method: str | None = None,
    seed: int | None = None,
    out: str | None = None,
    sets: list[str] = (),
) -> RunConfig:
    """Build the run config from a preset or a file, then --method, --seed, --out and --set overrides."""
    if (source is None) == (preset is None):
        raise ConfigError("give either a config file or --preset NAME")
    path = preset_path(preset) if preset else Path(source)
    src = str(path) + (f" (with --set {' '.join(sets)})" if sets else "")
    doc = _load_doc(path)
    overrides = doc.pop("overrides", {}) or {}
    if method is not None:
        if method != (doc.get("method") or {}).get("name"):
            doc["method"] = {"name": method}
    name = (doc.get("method") or {}).get("name", "seq-lora")
    if name in overrides:
        doc = deep_merge(doc, overrides[name])
    from .methods import get_method  # late: methods import the config types

    if getattr(get_method(name, src), "classifier_alignment", False):
        # a method defined with classifier alignment (inflora-ca) switches it on unless the config says otherwise
        doc.setdefault("align", {}).setdefault("enabled", True)
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
    try:
        cfg = RunConfig.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, src)) from None
    parsed = validate_method_section(cfg, src)
    cfg.method = {"name": cfg.method_name, **parsed.model_dump(mode="json")}
    return cfg


def validate_method_section(cfg: RunConfig, source: str):
    from .methods import get_method  # late: methods import the config types

    cls = get_method(cfg.method_name, source)
    try:
        parsed = cls.Config.model_validate({k: v for k, v in cfg.method.items() if k != "name"})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, prefix="method.")) from None
    return parsed


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
