"""Typed configuration: one pydantic model with documented defaults, loaded from YAML.

One configuration drives every command. Sources, later ones winning:
built-in defaults -> YAML file (``--config``) -> ``--set a.b=value`` overrides.

Validation happens here, at the edge, and reports every problem at once, each with its
field path (``phases.fine_tuning.epochs: must be >= 0, got -1``). Unknown keys are errors,
with a suggestion when one is close, so typos never pass silently; so are a key given twice
in the YAML file (PyYAML would keep the last) and a non-finite number. pydantic checks the
values; ``_problem_lines`` turns each of its errors into that one line.

The model is the only description of the settings: the reference (``docs/configuration.md``)
and the chart's JSON Schema of its ``trainer`` value are generated from it (trainer.config_docs),
and tests keep both in sync.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from trainer.contract import DEFAULT_LEASE_SECONDS, METRICS_PORT
from trainer.errors import ConfigError
from trainer.redact import redacted

VGG16_BLOCKS = ("block1", "block2", "block3", "block4", "block5")
#: VGG16 without its top accepts inputs of at least 32x32 pixels (five 2x2 poolings).
MIN_IMAGE_SIZE = 32
#: At or below this model input a random-area crop keeps too little of an image (data.augment.random_crop: auto).
SMALL_INPUT_SIZE = 64


# --------------------------------------------------------------------------- value types
# Strict: a YAML file says what it means, so "3" is no integer and true is no number. The
# conversions below are the ones YAML itself makes necessary.


def _number_from_text(value: Any) -> Any:
    """YAML 1.1 reads 1e-5 (no dot) as a string; learning rates are naturally written this way."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def _text_from_scalar(value: Any) -> Any:
    """An empty value means "", and YAML's numbers and dates (output.dir=2024-06-01) mean their text."""
    if value is None:
        return ""
    if isinstance(value, (int, float, datetime.date)) and not isinstance(value, bool):
        return str(value)
    return value


def _auto_is_none(value: Any) -> Any:
    return None if value == "auto" else value


def _on_off_from_bool(value: Any) -> Any:
    """YAML 1.1 reads unquoted on/off as booleans."""
    return ("on" if value else "off") if isinstance(value, bool) else value


Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict(), BeforeValidator(_text_from_scalar)]
# .inf/.nan (and "inf", "nan") would pass every range check or none.
Float = Annotated[float, Strict(), AllowInfNan(False), BeforeValidator(_number_from_text)]
#: A choice the run's plan makes (trainer.train.plan): None, written `auto`, until then.
AutoBool = Annotated[Bool | None, BeforeValidator(_auto_is_none), WithJsonSchema({"enum": ["auto", None, True, False]})]
# Helm reads unquoted on/off as booleans too: the chart's schema lets them through, the trainer maps them back.
OnOffAuto = Annotated[
    Literal["auto", "on", "off"],
    BeforeValidator(_on_off_from_bool),
    WithJsonSchema({"enum": ["auto", "on", "off", True, False]}),
]
Precision = Annotated[
    Literal["auto", "on", "off", "mixed_float16", "mixed_bfloat16"],
    BeforeValidator(_on_off_from_bool),
    WithJsonSchema({"enum": ["auto", "on", "off", "mixed_float16", "mixed_bfloat16", True, False]}),
]
Block = Literal[VGG16_BLOCKS]  # type: ignore[valid-type]


class Section(BaseModel):
    """A section of the configuration: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def _f(default: Any, doc: str, **checks: Any) -> Any:
    """A field with its documentation and optional range checks (ge, gt, le, lt); pydantic copies list defaults."""
    return Field(default, description=doc, **checks)


def _section(cls: type, doc: str) -> Any:
    return Field(default_factory=cls, description=doc)


class AugmentConfig(Section):
    random_crop: AutoBool = _f(
        None,
        f"Random-area crop for training images (Inception-style); false = centre crop; auto = on when "
        f"data.image_size is above {SMALL_INPUT_SIZE} (a crop of a small input loses most of what is in it).",
    )
    crop_area_min: Float = _f(0.35, "Smallest fraction of the image area a random crop keeps.", gt=0.0, le=1.0)
    horizontal_flip: AutoBool = _f(
        None,
        "Randomly flip training images left-right; auto = on, unless `trainer prepare` found the classes "
        "mirror-dependent (digits, text: a flipped image looks like no class or another one).",
    )
    vertical_flip: Bool = _f(False, "Randomly flip training images upside down (only for orientation-free data).")


class StagingConfig(Section):
    enabled: Bool = _f(False, "Copy this worker's shards to local disk in the background and read them from there.")
    dir: Str = _f("", "Local directory for the copies; empty = $TRAINER_SCRATCH_DIR, else the system temp dir.")
    budget_gb: Float = _f(
        0.0,
        "Disk the copies may use (GB); shards beyond it are read remotely. 0 = follow the disk: the chart sets "
        "90% of scratch.sizeLimit, elsewhere 90% of the directory's free space at start.",
        ge=0,
    )
    parallel_downloads: Int = _f(4, "Concurrent shard downloads per worker.", ge=1)


class DataConfig(Section):
    dataset: Str = _f("", "Prepared dataset directory (local path or gs://bucket/prefix) holding manifest.json.")
    image_size: Int = _f(224, "Side of the square model input in pixels (VGG16 needs >= 32).", ge=MIN_IMAGE_SIZE)
    center_crop_fraction: Float = _f(
        0.875, "Evaluation: fraction of the shorter side kept by the centre crop.", gt=0.0, le=1.0
    )
    shuffle_buffer: Int = _f(2048, "Records in the training shuffle buffer (per worker).", ge=1)
    read_parallelism: Int = _f(0, "Shards read concurrently per worker; 0 = tf.data AUTOTUNE.", ge=0)
    prefetch_batches: Int = _f(0, "Batches prefetched ahead of training; 0 = AUTOTUNE.", ge=0)
    augment: AugmentConfig = _section(AugmentConfig, "Training-time augmentation.")
    staging: StagingConfig = _section(StagingConfig, "Optional local copies of remote (gs://) training shards.")


class PrepareConfig(Section):
    shard_size_mb: Float = _f(128.0, "Target size of one TFRecord shard in MB (tf.data guidance: 100-200).", gt=0)
    min_shards: Int = _f(
        16,
        "Cut each split into at least this many shards (capped by its image count) so many workers can read it.",
        ge=1,
    )
    validation_fraction: Float = _f(
        0.2, "Share of each class held out for validation when the source has no validation/ folder.", ge=0.0, lt=1.0
    )
    test_fraction: Float = _f(
        0.0, "Share of each class held out as a test split when the source has no test/ folder.", ge=0.0, lt=1.0
    )
    seed: Int = _f(1234, "Seed of the stratified split: the same seed and files give the same split.")
    processes: Int = _f(0, "Worker processes that read and check images; 0 = one per CPU core.", ge=0)
    min_image_side: Int = _f(MIN_IMAGE_SIZE, "Images whose shorter side is below this are skipped and listed.", ge=1)
    max_file_mb: Float = _f(
        64.0,
        "Files larger than this (MB) are skipped and listed without being read: a stored JPEG goes whole into a "
        "record and into a worker's memory, and even a 60 MP camera JPEG at top quality is about 30 MB.",
        gt=0,
    )
    image_size: Int = _f(
        224,
        "Store images for training at this model input (data.image_size): each is scaled down so its shorter "
        "side is 8/7 of it (256 px for 224), the ImageNet resize-256-crop-224 convention, and re-encoded as JPEG; "
        "smaller images are stored as they are. Decoding then reads no more pixels than training uses. A run "
        "with a larger data.image_size is refused. 0 = store every file's bytes unchanged (JPEGs) or as RGB PNG.",
        ge=0,
    )
    jpeg_quality: Int = _f(90, "JPEG quality of the images prepare.image_size scales down.", ge=50, le=100)
    max_image_megapixels: Float = _f(
        90.0,
        "Images with more pixels (width x height, read from the file header) are skipped and listed without being "
        "decoded: decoding takes 3-4 bytes per pixel in each worker (90 MP: 270-360 MB). 90 is above the largest "
        "camera photos (about 60 MP) and close to Pillow's own decompression-bomb warning limit (89.5 MP).",
        gt=0,
    )


class HeadConfig(Section):
    pooling: Literal["avg", "flatten"] = _f("avg", "How the 7x7x512 base output becomes a vector.")
    dense_units: list[Int] = _f([256], "Hidden dense layers of the head, in order; [] = none.")
    activation: Str = _f("relu", "Activation of the hidden dense layers.")
    dropout: Float = _f(0.5, "Dropout rate after each hidden dense layer.", ge=0.0, lt=1.0)


class ModelConfig(Section):
    weights: Str = _f(
        "imagenet",
        "Base weights: 'imagenet' (Keras download, cached), 'none' (random), or a path to a VGG16 .h5 weights file.",
    )
    head: HeadConfig = _section(HeadConfig, "The classification head on top of the VGG16 base.")


class OptimizerConfig(Section):
    name: Literal["sgd", "adam", "rmsprop"] = _f("adam", "Optimizer.")
    learning_rate: Float = _f(
        1e-3, "Learning rate at train.reference_batch_size; scaled to the global batch by train.lr_scaling.", gt=0.0
    )
    momentum: Float = _f(0.9, "Momentum (sgd, rmsprop).", ge=0.0, lt=1.0)
    weight_decay: Float = _f(0.0, "Decoupled weight decay; 0 = off.", ge=0.0)
    clipnorm: Float = _f(0.0, "Clip each gradient to this norm; 0 = off.", ge=0.0)


class ScheduleConfig(Section):
    name: Literal["constant", "cosine"] = _f("constant", "Learning-rate schedule within the phase.")
    warmup_epochs: Float = _f(0.0, "Linear warm-up from 0 over this many epochs (helps large global batches).", ge=0.0)


class PhaseConfig(Section):
    epochs: Int = _f(5, "Epochs of this phase; 0 skips it.", ge=0)
    unfreeze_blocks: list[Block] = _f([], "VGG16 blocks trained in this phase (block1..block5); [] = base frozen.")
    optimizer: OptimizerConfig = _section(OptimizerConfig, "Optimizer of this phase.")
    schedule: ScheduleConfig = _section(ScheduleConfig, "Learning-rate schedule of this phase.")
    early_stopping_patience: Int = _f(
        0,
        "Stop the phase after this many epochs without improvement of train.monitor (counted from its best "
        "epoch, or from its start; survives restarts); 0 = off.",
        ge=0,
    )


def _fine_tuning_defaults() -> PhaseConfig:
    return PhaseConfig(
        epochs=5,
        unfreeze_blocks=["block5"],
        optimizer=OptimizerConfig(name="sgd", learning_rate=1e-4, momentum=0.9),
    )


#: The training phases in the order they run: what each does, and its defaults.
PHASES: dict[str, tuple[str, Callable[[], PhaseConfig]]] = {
    "feature_extraction": (
        "Phase 1: the base is frozen, only the head learns (unfreeze_blocks must stay []).",
        PhaseConfig,
    ),
    "fine_tuning": (
        "Phase 2: unfreeze the named top blocks and continue at a lower learning rate.",
        _fine_tuning_defaults,
    ),
}
PHASE_NAMES = tuple(PHASES)
PhaseName = Literal[PHASE_NAMES]  # type: ignore[valid-type]


def _default_phases() -> dict[str, PhaseConfig]:
    return {name: make_default() for name, (_, make_default) in PHASES.items()}


def _phases_by_name_schema(schema: dict[str, Any]) -> None:
    """JSON Schema: one property per phase name (a typo is "additional property 'fine_tunning'")."""
    phase = schema.pop("additionalProperties")
    schema.pop("propertyNames", None)
    schema["properties"] = {name: {**phase, "description": doc} for name, (doc, _) in PHASES.items()}
    schema["additionalProperties"] = False


class TrainConfig(Section):
    batch_size_per_replica: Int = _f(32, "Images per replica per step; global batch = this x replicas.", ge=1)
    reference_batch_size: Int = _f(32, "Global batch size at which the phases' learning rates are given.", ge=1)
    lr_scaling: Literal["linear", "sqrt", "none"] = _f(
        "linear", "How learning rates follow the global batch: lr x (global/reference), its square root, or fixed."
    )
    steps_per_epoch: Int = _f(0, "Training steps per epoch; 0 = train images // global batch.", ge=0)
    validation_steps: Int = _f(0, "Validation batches per epoch; 0 = the whole validation split.", ge=0)
    backup_every_steps: Int = _f(50, "Write a resumable backup every this many steps.", ge=1)
    backups_to_keep: Int = _f(2, "Complete backups kept per phase (older ones are deleted).", ge=1)
    monitor: Literal["val_accuracy", "val_loss"] = _f(
        "val_accuracy", "Metric that selects the best model and drives early stopping."
    )
    label_smoothing: Float = _f(0.0, "Label smoothing of the cross-entropy loss.", ge=0.0, lt=1.0)
    cache_frozen_features: Bool = _f(
        False,
        "A phase with the whole base frozen runs each image through the base once, caches the features on "
        "local scratch disk and trains the head on them (epochs many times faster). Cached images are "
        "unaugmented (see train.cache_views), so such a phase ignores data.augment.",
    )
    cache_frozen_blocks: Bool = _f(
        False,
        "A phase that trains only top blocks (the default fine-tuning phase trains block5) runs each image "
        "once through the frozen blocks below them, caches their output (block4's pooled features for "
        "block5) on local scratch disk and trains the top blocks and the head on it; the model and its "
        "export stay the whole network. Same caveats as cache_frozen_features.",
    )
    cache_views: Int = _f(
        0,
        "Views per training image in a feature cache when data.augment is on: 0 = each image's centre "
        "crop once (the cached phase then trains unaugmented); N = N augmented views (random crop, "
        "flips), N times the cache's disk and its first epoch's time, every epoch drawing from all.",
        ge=0,
    )


class RuntimeConfig(Section):
    mixed_precision: Precision = _f(
        "auto",
        "Mixed-precision compute (the head's softmax stays float32): auto = mixed_float16 with loss "
        "scaling when training on GPUs, off on CPU; on = mixed_float16; mixed_bfloat16 (no loss "
        "scaling; for CPUs with AVX-512 BF16/AMX and TPUs) or mixed_float16 by name.",
    )
    jit_compile: Bool = _f(
        False,
        "Compile the training step's compute (forward, loss, backward) with XLA; the all-reduce and the "
        "optimizer update stay outside it (XLA has no collectives on CPU devices).",
    )
    cpu_devices: Int = _f(
        1,
        "Split the CPU into this many logical devices, one replica each, when the machine has no GPU: "
        "runs the several-GPUs-per-worker code paths (MirroredStrategy, and several devices per "
        "worker under MultiWorkerMirroredStrategy) on CPU machines, for tests; no speed-up.",
        ge=1,
    )
    all_reduce: Literal["auto", "nccl", "ring"] = _f(
        "auto",
        "Multi-worker gradient all-reduce: auto (TensorFlow picks NCCL on GPUs), nccl (GPUs), or ring "
        "(TensorFlow's own ring over gRPC; CPU or GPU).",
    )
    all_reduce_pack_mb: Float = _f(
        0.0,
        "Multi-worker: all-reduce the gradients in packs of this many MiB, so communication overlaps "
        "the rest of the step; 0 = TensorFlow decides.",
        ge=0,
    )
    deterministic: Bool = _f(False, "Deterministic ops and input order (for tests; slower).")
    seed: Int = _f(42, "Seed for weights initialisation, shuffling and augmentation.")
    peer_wait_seconds: Float = _f(
        600.0, "Multi-worker: how long a worker waits at start for every peer to answer before giving up.", gt=0
    )
    collective_timeout_seconds: Float = _f(
        300.0, "Multi-worker: a collective that takes longer than this fails instead of hanging.", gt=0
    )
    stop_check_every_steps: Int = _f(
        10,
        "Multi-worker: the workers agree whether one got SIGTERM at least every this many steps (and at "
        "every epoch end); each check is a two-float all-reduce (a few ms), a stop waits for the next check.",
        ge=1,
    )
    stop_check_seconds: Float = _f(
        10.0,
        "Multi-worker: ... and at least this often in seconds when steps are slow (after every step when "
        "one step takes longer). A stop then takes at most this long plus one step and one backup; the "
        "launcher's grace and the chart's terminationGracePeriodSeconds are sized from it.",
        gt=0,
    )
    heartbeat_timeout_seconds: Float = _f(
        60.0,
        "Multi-worker: a worker silent this long (dead, frozen, node gone) is declared failed and every "
        "worker stops with an error (exit 75) instead of hanging. Also how long the chief waits for "
        "its peers to exit after the final barrier.",
        gt=0,
    )
    verbose: Int = _f(2, "Keras progress output: 0 silent, 1 progress bar, 2 one line per epoch.", ge=0, le=2)


class OutputConfig(Section):
    dir: Str = _f("", "Run directory (local path or gs://bucket/prefix): backups, logs, best model, export, summary.")
    evaluation_report: Bool = _f(
        True,
        "At the end, run the export's serving signature over the test split (else validation) on every worker "
        "and write evaluation/<split>/evaluation.json and confusion-matrix.png (trainer.report).",
    )
    lease_seconds: Float = _f(
        float(DEFAULT_LEASE_SECONDS),
        "The chief holds output.dir with a lease (owner.json) renewed every quarter of this; a lease not "
        "renewed for this long is stale and another run may take it (trainer.train.lease).",
        ge=10,
    )
    lease_wait_seconds: Float = _f(
        0.0,
        "How long a run waits for another live run holding output.dir to end before it fails (exit 75). "
        "0 = fail at once; the chart sets terminationGracePeriodSeconds + lease_seconds, so the Job a "
        "`helm upgrade` starts waits for the old Job's pods to stop.",
        ge=0,
    )


class StorageConfig(Section):
    retry_budget_seconds: Float = _f(
        120.0, "Seconds one storage operation may spend retrying transient failures (429, 5xx, timeouts).", gt=0
    )
    upload_workers: Int = _f(8, "Parallel uploads when `prepare` writes to gs://.", ge=1)


class MonitoringConfig(Section):
    enabled: Bool = _f(True, "Serve Prometheus metrics on every worker (started before TensorFlow).")
    port: Int = _f(
        METRICS_PORT,
        "Port of the metrics endpoint; 0 = any free port. $TRAINER_METRICS_PORT overrides it (the local "
        "launcher gives each worker its own). The chart's metrics port (container port, liveness probe, "
        "Service, NetworkPolicy, monitors) follows it; the chart refuses 0, ports below 1024 and the worker port.",
        ge=0,
        le=65535,
    )
    address: Str = _f(
        "",
        "Address the endpoint listens on; empty = every IPv4 interface (0.0.0.0), :: = IPv6 and IPv4. "
        "In a pod the liveness probe and Prometheus connect to the pod's IP: the chart accepts only these.",
    )
    pushgateway_url: Str = _f(
        "",
        "Pushgateway the chief pushes the run's outcome to when it ends, e.g. http://pushgateway:9091; empty = "
        "off. $TRAINER_PUSHGATEWAY_URL overrides it (the chart sets it from a Secret). Credentials "
        "(https://user:password@host) go as basic auth and are left out of logs, summary.json and `trainer config`.",
    )
    pushgateway_job: Str = _f("vgg-trainer", "The `job` label of the pushed outcome.")
    curves: Bool = _f(True, "The chief draws the training curves into training-curves.png beside summary.json.")


RECIPE_CHOICES = ("auto", "transfer", "scratch", "notebook")


class Config(Section):
    recipe: Literal[RECIPE_CHOICES] = _f(  # type: ignore[valid-type]
        "auto",
        "What trains when, as one setting (see Recipes below); a setting you give always wins over its recipe. "
        "auto = transfer with pretrained weights (imagenet or a file), scratch with model.weights=none.",
    )
    data: DataConfig = _section(DataConfig, "Input data and the tf.data pipeline.")
    prepare: PrepareConfig = _section(PrepareConfig, "How `trainer prepare` turns an image folder into shards.")
    model: ModelConfig = _section(ModelConfig, "The VGG16 model.")
    phases: dict[PhaseName, PhaseConfig] = Field(
        default_factory=_default_phases,
        description="The training phases, by name, in the order they run.",
        json_schema_extra=_phases_by_name_schema,
    )
    train: TrainConfig = _section(TrainConfig, "Settings shared by both phases.")
    runtime: RuntimeConfig = _section(RuntimeConfig, "Devices, precision and determinism.")
    output: OutputConfig = _section(OutputConfig, "Where results go.")
    storage: StorageConfig = _section(StorageConfig, "Object storage (gs://) behaviour.")
    monitoring: MonitoringConfig = _section(MonitoringConfig, "Metrics endpoint, Pushgateway and training curves.")

    @field_validator("phases")
    @classmethod
    def _every_phase_in_order(cls, phases: dict[str, PhaseConfig]) -> dict[str, PhaseConfig]:
        """Every phase, in the order they run; one not given has its defaults."""
        return {name: phases[name] if name in phases else make_default() for name, (_, make_default) in PHASES.items()}

    @model_validator(mode="after")
    def _settings_agree(self) -> Config:
        """Checks across fields; pydantic runs them only once every field is valid on its own."""
        problems = _disagreements(self)
        if problems:
            raise PydanticCustomError("disagreement", "settings disagree", {"problems": problems})
        return self


def _disagreements(config: Config) -> list[str]:
    problems = []
    phases = config.phases
    if phases["feature_extraction"].unfreeze_blocks:
        problems.append(
            "phases.feature_extraction.unfreeze_blocks: the base is frozen in feature extraction; "
            "list blocks under phases.fine_tuning.unfreeze_blocks instead"
        )
    if not any(phase.epochs for phase in phases.values()):
        problems.append("phases: both phases have 0 epochs; set phases.feature_extraction.epochs or fine_tuning.epochs")
    if config.prepare.validation_fraction + config.prepare.test_fraction >= 1.0:
        problems.append("prepare: validation_fraction + test_fraction must leave images for training (sum < 1)")
    if config.runtime.jit_compile and config.runtime.cpu_devices > 1:
        problems.append(
            "runtime.jit_compile: XLA across logical CPU devices of one process fails in TensorFlow 2.21; "
            "set runtime.cpu_devices=1 or runtime.jit_compile=false"
        )
    if not config.model.weights:
        problems.append("model.weights: empty; use 'imagenet', 'none' or a path to a .h5 weights file")
    return problems


# --------------------------------------------------------------------------- loading


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then ``a.b=value`` overrides; validated."""
    raw: dict[str, Any] = {}
    if path:
        raw = _read_yaml(path)
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw)


#: Settings without a usable default: what each takes, for the message when one is missing.
REQUIRED = {
    "data.dataset": "DATASET (a directory written by `trainer prepare`, local or gs://bucket/prefix)",
    "output.dir": "RUN_DIR (local path or gs://bucket/prefix)",
}


def require(config: Config, *paths: str) -> None:
    """ConfigError naming each setting of ``paths`` that is empty and how to set it."""
    missing = [path for path in paths if not lookup(config, path)]
    if not missing:
        return
    how = " ".join(f"--set {path}={REQUIRED[path]}" for path in missing)
    verb, pronoun = ("is", "it") if len(missing) == 1 else ("are", "them")
    raise ConfigError(f"{' and '.join(missing)} {verb} not set; pass {how}, or set {pronoun} in the --config file")


def lookup(config: Config, path: str) -> Any:
    """The value at a dotted path, e.g. ``phases.fine_tuning.epochs``."""
    node: Any = config
    for part in path.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config; every problem is reported in one ConfigError.

    Layers, later ones winning key by key: the defaults, the recipe's settings, ``raw``. So a
    section given in part keeps the defaults of the keys it does not name (fine_tuning stays
    sgd on block5 when only its epochs are set).
    """
    recipe = recipe_of(raw)
    layered = _merged(Config().model_dump(), recipe_settings(recipe) if recipe else {})
    try:
        return Config.model_validate(_merged(layered, raw))
    except ValidationError as err:
        problems = [line for detail in err.errors() for line in _problem_lines(detail)]
    count = f"{len(problems)} configuration problem{'s' if len(problems) > 1 else ''}"
    raise ConfigError(f"{count}: " + "; ".join(problems))


# --------------------------------------------------------------------------- recipes

#: Each recipe: (why it exists, {setting: (value, why)}). ``transfer`` is the field defaults themselves.
RECIPES: dict[str, tuple[str, dict[str, tuple[Any, str]]]] = {
    "transfer": (
        "pretrained base weights: train the head on the frozen base, then fine-tune the top block",
        {},
    ),
    "scratch": (
        "random base weights (model.weights=none): a frozen random base computes features nothing can learn "
        "from, so every block trains from the start",
        {
            "phases.feature_extraction.epochs": (0, "a frozen random base teaches the head nothing"),
            "phases.fine_tuning.unfreeze_blocks": (list(VGG16_BLOCKS), "random weights: every block must learn"),
            "phases.fine_tuning.optimizer.name": ("adam", "Adam trains a deep random network where SGD stalls"),
            "phases.fine_tuning.optimizer.learning_rate": (
                1e-4,
                "Adam at 1e-4 (per 32 images) trains VGG16 from random weights without diverging",
            ),
            "phases.fine_tuning.epochs": (10, "a random VGG16 reached 0.95 on 1,257 scanned digits in 8"),
            "phases.fine_tuning.schedule.name": ("cosine", "decaying to 0 settles the last epochs"),
            "phases.fine_tuning.schedule.warmup_epochs": (0.5, "a short warm-up keeps Adam's first steps small"),
        },
    ),
    "notebook": (
        "the notebook this product replaces (VGG16, Flatten-256-Dropout head, `base.layers[:-5]` frozen, "
        "Adam 1e-4, 20 epochs with early stopping on val_loss), to reproduce its numbers here",
        {
            "model.head.pooling": ("flatten", "the notebook's Flatten()"),
            "model.head.dense_units": ([256], "the notebook's Dense(256)"),
            "model.head.activation": ("relu", "the notebook's Dense(256, activation='relu')"),
            "model.head.dropout": (0.5, "the notebook's Dropout(0.5)"),
            "phases.feature_extraction.epochs": (0, "the notebook trains one phase"),
            "phases.fine_tuning.unfreeze_blocks": (["block5"], "`base.layers[:-5]` frozen leaves block5 trainable"),
            "phases.fine_tuning.optimizer.name": ("adam", "the notebook's Adam"),
            "phases.fine_tuning.optimizer.learning_rate": (1e-4, "the notebook's Adam(learning_rate=1e-4)"),
            "phases.fine_tuning.epochs": (20, "the notebook's epochs=20"),
            "phases.fine_tuning.early_stopping_patience": (3, "the notebook's EarlyStopping(patience=3)"),
            "train.monitor": ("val_loss", "the notebook's EarlyStopping(monitor='val_loss')"),
            "train.lr_scaling": ("none", "the notebook's learning rate does not follow the batch"),
            "data.augment.horizontal_flip": (True, "the notebook's ImageDataGenerator(horizontal_flip=True)"),
            "data.augment.random_crop": (True, "closest to the notebook's zoom_range=0.2 and shifts"),
            "data.augment.crop_area_min": (0.64, "zoom_range=0.2 keeps at least 0.8 x 0.8 of an image"),
        },
    ),
}


def recipe_of(raw: dict[str, Any]) -> str | None:
    """The recipe ``raw`` asks for, with auto resolved; None when the value is invalid (reported later)."""
    name = raw.get("recipe", "auto") if isinstance(raw, dict) else "auto"
    if name not in RECIPE_CHOICES:
        return None
    if name != "auto":
        return name
    model = raw.get("model")
    default = ModelConfig.model_fields["weights"].default
    weights = model.get("weights", default) if isinstance(model, dict) else default
    return "scratch" if weights == "none" else "transfer"


def recipe_settings(name: str) -> dict[str, Any]:
    """A recipe's settings as a nested mapping, as a YAML file would give them."""
    nested: dict[str, Any] = {}
    for key, (value, _) in RECIPES[name][1].items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _merged(base: Any, over: Any) -> Any:
    """``over`` laid on ``base`` mapping by mapping; anything else in ``over`` replaces what lies below."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    return {**base, **{key: _merged(base.get(key), value) for key, value in over.items()}}


def _read_yaml(path: str) -> dict[str, Any]:
    from trainer import storage

    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; pass an existing YAML file to --config") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"config file {path} cannot be read ({type(err).__name__}); pass a readable YAML file to --config"
        ) from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(err)}; fix that line") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently).

    A repeated section (two ``train:`` blocks) would drop every setting of the first one unseen.
    Merge keys (``<<: *defaults``) may still be overridden: only keys written out are compared.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                with contextlib.suppress(TypeError):  # an unhashable key: construct_mapping reports it
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key!r} is given twice (first on line {seen[key]})", key_node.start_mark
                        )
                    seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: what is wrong and where (PyYAML's message spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(err, "context", None)
    context_mark = getattr(err, "context_mark", None)
    if context and context_mark is not None and context_mark.line != getattr(mark, "line", None):
        context += f" that starts on line {context_mark.line + 1}"
    return f"{where}{problem}" + (f" ({context})" if context else "")


def set_args(*settings: str) -> list[str]:
    """Command-line ``--set`` arguments for ``key=value`` settings (what another `trainer` process takes)."""
    return [arg for item in settings for arg in ("--set", item)]


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.batch_size_per_replica=16")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


# --------------------------------------------------------------------------- pydantic's errors, one line each

#: pydantic error types -> what the setting expects.
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "model_type": "a mapping",
    "dict_type": "a mapping",
    "finite_number": "a finite number",
}
#: pydantic error types of range checks -> (the check's keyword, its symbol).
_BOUNDS = {
    "greater_than_equal": ("ge", ">="),
    "greater_than": ("gt", ">"),
    "less_than_equal": ("le", "<="),
    "less_than": ("lt", "<"),
}


def _problem_lines(detail: ErrorDetails) -> list[str]:
    """One pydantic error as today's lines: ``path: what is wrong, got what``."""
    kind, loc, value = detail["type"], detail["loc"], detail["input"]
    path = _path(loc) or "config"  # the whole file, e.g. a list instead of a mapping
    if kind == "disagreement":
        return list(detail["ctx"]["problems"])
    if kind == "extra_forbidden":
        return [_unknown_key_message(str(loc[-1]), _path(loc[:-1]), _known_keys(loc[:-1]))]
    if loc[-1:] == ("[key]",):  # a mapping's key outside its choices: an unknown phase name
        return [_unknown_key_message(str(loc[-2]), _path(loc[:-2]), _known_keys(loc[:-2]))]
    if kind == "literal_error":
        choices = ", ".join(map(str, typing.get_args(_hint_at(loc))))
        return [f"{path}: expected one of {choices}, got {_describe(value)}"]
    if kind == "finite_number":
        return [f"{path}: expected a finite number, got {value}"]
    if kind in _EXPECTED:
        return [f"{path}: expected {_EXPECTED[kind]}, got {_describe(value)}"]
    if kind in _BOUNDS:
        keyword, symbol = _BOUNDS[kind]
        return [f"{path}: must be {symbol} {detail['ctx'][keyword]}, got {value}"]
    return [f"{path}: {detail['msg']}, got {_describe(value)}"]


def _path(loc: tuple[int | str, ...]) -> str:
    """``('phases', 'fine_tuning', 'unfreeze_blocks', 1)`` -> ``phases.fine_tuning.unfreeze_blocks[1]``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _hint_at(loc: tuple[int | str, ...]) -> Any:
    """The type the model declares at ``loc``: a model's field, or the values of a mapping or list."""
    hint: Any = Config
    for part in loc:
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            hint = hint.model_fields[str(part)].annotation
        else:
            hint = typing.get_args(hint)[-1]
        while typing.get_origin(hint) is Annotated:
            hint = typing.get_args(hint)[0]
    return hint


def _known_keys(loc: tuple[int | str, ...]) -> list[str]:
    hint = _hint_at(loc)
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return list(hint.model_fields)
    return list(typing.get_args(typing.get_args(hint)[0]))  # dict[Literal[names], ...]


def _unknown_key_message(key: str, path: str, known: list[str]) -> str:
    where = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
    return f"{where}: unknown key; {hint}"


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"


# --------------------------------------------------------------------------- output


def to_dict(config: BaseModel) -> dict[str, Any]:
    """The configuration as plain data, credentials in URLs removed: what summary.json and
    `trainer config` show (a Pushgateway URL's user:password@ never reaches a file)."""
    return redacted(config.model_dump())


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)
