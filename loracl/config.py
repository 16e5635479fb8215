"""The types of a run config: one typed, validated section per concern, nothing else.

This module is a leaf: it imports no other part of loracl but its errors. Reading YAML, presets, `extends:`,
per-method `overrides:`, `--set` and resolving the method section into its method's own typed Config happen in
one place, `loracl.runs.assembly`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator

from .errors import ConfigError


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
    expect: dict[str, int] | None = Field(None, description="{train: n, test: n}: the image counts this spec should "
                                                            "give (`loracl data check`)")

    @field_validator("split_files", "max_per_class", "expect")
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

    @field_validator("rrc_scale")
    @classmethod
    def _fractions(cls, v):
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"needs 0 < low <= high <= 1, got {list(v)}")
        return v
    val_fraction: float = Field(0.0, ge=0, lt=1, description="carve a seeded, class-stratified validation split of "
                                                           "this fraction from every task's training images "
                                                           "(results.json: val_metrics; loracl sweep --select)")
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
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm (None: no clipping)")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap for smoke runs")
    checkpoint_every: int = Field(0, ge=0, description="also checkpoint every N steps (0: task boundaries only)")
    keep_checkpoints: int | None = Field(
        None, ge=1, description="keep only the newest N task checkpoints (None: all; the last one is what resume, "
                                "export and predict read; earlier ones feed per-task diagnostics)")
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
    features sampled from stored per-class Gaussians (loracl/cl/alignment.py; BASELINES.md section 1)."""

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


class MethodConfig(BaseModel):
    """The `method:` section. `name` picks a method or a named configuration of one (inflora-ca, keeplora+);
    each method's Config subclass adds its typed keys, and the assembly validates the section into it once."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str = "seq-lora"


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
    method: SerializeAsAny[MethodConfig] = Field(default_factory=MethodConfig)
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
        return self.method.name
