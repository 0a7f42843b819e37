"""Typed configuration: dataclasses with documented defaults, loaded from YAML.

One configuration drives every command. Sources, later ones winning:
built-in defaults -> YAML file (``--config``) -> ``--set a.b=value`` overrides.

Validation happens here, at the edge, and reports every problem at once, each with its
field path (``phases.fine_tuning.epochs: expected an integer >= 0, got -1``). Unknown
keys are errors, with a suggestion when one is close, so typos never pass silently; so are a
key given twice in the YAML file (PyYAML would keep the last) and a non-finite number.

Every field's ``doc`` metadata is the configuration reference: ``docs/configuration.md``
is generated from it (``trainer config --reference``) and a test keeps the two in sync.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from trainer.contract import DEFAULT_LEASE_SECONDS, METRICS_PORT
from trainer.errors import ConfigError
from trainer.redact import redacted

VGG16_BLOCKS = ("block1", "block2", "block3", "block4", "block5")
#: VGG16 without its top accepts inputs of at least 32x32 pixels (five 2x2 poolings).
MIN_IMAGE_SIZE = 32
#: At or below this model input a random-area crop keeps too little of an image (data.augment.random_crop: auto).
SMALL_INPUT_SIZE = 64


def _f(default: Any, doc: str, **checks: Any) -> Any:
    """A dataclass field with documentation and optional checks (ge, gt, le, lt)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **checks})
    return field(default=default, metadata={"doc": doc, **checks})


def _section(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc})


@dataclass
class AugmentConfig:
    random_crop: bool | None = _f(
        None,
        f"Random-area crop for training images (Inception-style); false = centre crop; auto = on when "
        f"data.image_size is above {SMALL_INPUT_SIZE} (a crop of a small input loses most of what is in it).",
        auto=True,
    )
    crop_area_min: float = _f(0.35, "Smallest fraction of the image area a random crop keeps.", gt=0.0, le=1.0)
    horizontal_flip: bool | None = _f(
        None,
        "Randomly flip training images left-right; auto = on, unless `trainer prepare` found the classes "
        "mirror-dependent (digits, text: a flipped image looks like no class or another one).",
        auto=True,
    )
    vertical_flip: bool = _f(False, "Randomly flip training images upside down (only for orientation-free data).")


@dataclass
class StagingConfig:
    enabled: bool = _f(False, "Copy this worker's shards to local disk in the background and read them from there.")
    dir: str = _f("", "Local directory for the copies; empty = $TRAINER_SCRATCH_DIR, else the system temp dir.")
    budget_gb: float = _f(
        0.0,
        "Disk the copies may use (GB); shards beyond it are read remotely. 0 = follow the disk: the chart sets "
        "90% of scratch.sizeLimit, elsewhere 90% of the directory's free space at start.",
        ge=0,
    )
    parallel_downloads: int = _f(4, "Concurrent shard downloads per worker.", ge=1)


@dataclass
class DataConfig:
    dataset: str = _f("", "Prepared dataset directory (local path or gs://bucket/prefix) holding manifest.json.")
    image_size: int = _f(224, "Side of the square model input in pixels (VGG16 needs >= 32).", ge=MIN_IMAGE_SIZE)
    center_crop_fraction: float = _f(
        0.875, "Evaluation: fraction of the shorter side kept by the centre crop.", gt=0.0, le=1.0
    )
    shuffle_buffer: int = _f(2048, "Records in the training shuffle buffer (per worker).", ge=1)
    read_parallelism: int = _f(0, "Shards read concurrently per worker; 0 = tf.data AUTOTUNE.", ge=0)
    prefetch_batches: int = _f(0, "Batches prefetched ahead of training; 0 = AUTOTUNE.", ge=0)
    augment: AugmentConfig = _section(AugmentConfig, "Training-time augmentation.")
    staging: StagingConfig = _section(StagingConfig, "Optional local copies of remote (gs://) training shards.")


@dataclass
class PrepareConfig:
    shard_size_mb: float = _f(128.0, "Target size of one TFRecord shard in MB (tf.data guidance: 100-200).", gt=0)
    min_shards: int = _f(
        16,
        "Cut each split into at least this many shards (capped by its image count) so many workers can read it.",
        ge=1,
    )
    validation_fraction: float = _f(
        0.2, "Share of each class held out for validation when the source has no validation/ folder.", ge=0.0, lt=1.0
    )
    test_fraction: float = _f(
        0.0, "Share of each class held out as a test split when the source has no test/ folder.", ge=0.0, lt=1.0
    )
    seed: int = _f(1234, "Seed of the stratified split: the same seed and files give the same split.")
    processes: int = _f(0, "Worker processes that read and check images; 0 = one per CPU core.", ge=0)
    min_image_side: int = _f(MIN_IMAGE_SIZE, "Images whose shorter side is below this are skipped and listed.", ge=1)
    max_file_mb: float = _f(
        64.0,
        "Files larger than this (MB) are skipped and listed without being read: a stored JPEG goes whole into a "
        "record and into a worker's memory, and even a 60 MP camera JPEG at top quality is about 30 MB.",
        gt=0,
    )
    max_image_megapixels: float = _f(
        90.0,
        "Images with more pixels (width x height, read from the file header) are skipped and listed without being "
        "decoded: decoding takes 3-4 bytes per pixel in each worker (90 MP: 270-360 MB). 90 is above the largest "
        "camera photos (about 60 MP) and close to Pillow's own decompression-bomb warning limit (89.5 MP).",
        gt=0,
    )


@dataclass
class HeadConfig:
    pooling: Literal["avg", "flatten"] = _f("avg", "How the 7x7x512 base output becomes a vector.")
    dense_units: list[int] = _f([256], "Hidden dense layers of the head, in order; [] = none.")
    activation: str = _f("relu", "Activation of the hidden dense layers.")
    dropout: float = _f(0.5, "Dropout rate after each hidden dense layer.", ge=0.0, lt=1.0)


@dataclass
class ModelConfig:
    weights: str = _f(
        "imagenet",
        "Base weights: 'imagenet' (Keras download, cached), 'none' (random), or a path to a VGG16 .h5 weights file.",
    )
    head: HeadConfig = _section(HeadConfig, "The classification head on top of the VGG16 base.")


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adam", "rmsprop"] = _f("adam", "Optimizer.")
    learning_rate: float = _f(
        1e-3, "Learning rate at train.reference_batch_size; scaled to the global batch by train.lr_scaling.", gt=0.0
    )
    momentum: float = _f(0.9, "Momentum (sgd, rmsprop).", ge=0.0, lt=1.0)
    weight_decay: float = _f(0.0, "Decoupled weight decay; 0 = off.", ge=0.0)
    clipnorm: float = _f(0.0, "Clip each gradient to this norm; 0 = off.", ge=0.0)


@dataclass
class ScheduleConfig:
    name: Literal["constant", "cosine"] = _f("constant", "Learning-rate schedule within the phase.")
    warmup_epochs: float = _f(0.0, "Linear warm-up from 0 over this many epochs (helps large global batches).", ge=0.0)


@dataclass
class PhaseConfig:
    epochs: int = _f(5, "Epochs of this phase; 0 skips it.", ge=0)
    unfreeze_blocks: list[str] = _f([], "VGG16 blocks trained in this phase (block1..block5); [] = base frozen.")
    optimizer: OptimizerConfig = _section(OptimizerConfig, "Optimizer of this phase.")
    schedule: ScheduleConfig = _section(ScheduleConfig, "Learning-rate schedule of this phase.")
    early_stopping_patience: int = _f(
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


@dataclass
class PhasesConfig:
    feature_extraction: PhaseConfig = _section(
        PhaseConfig, "Phase 1: the base is frozen, only the head learns (unfreeze_blocks must stay [])."
    )
    fine_tuning: PhaseConfig = field(
        default_factory=_fine_tuning_defaults,
        metadata={"doc": "Phase 2: unfreeze the named top blocks and continue at a lower learning rate."},
    )


@dataclass
class TrainConfig:
    batch_size_per_replica: int = _f(32, "Images per replica per step; global batch = this x replicas.", ge=1)
    reference_batch_size: int = _f(32, "Global batch size at which the phases' learning rates are given.", ge=1)
    lr_scaling: Literal["linear", "sqrt", "none"] = _f(
        "linear", "How learning rates follow the global batch: lr x (global/reference), its square root, or fixed."
    )
    steps_per_epoch: int = _f(0, "Training steps per epoch; 0 = train images // global batch.", ge=0)
    validation_steps: int = _f(0, "Validation batches per epoch; 0 = the whole validation split.", ge=0)
    backup_every_steps: int = _f(50, "Write a resumable backup every this many steps.", ge=1)
    backups_to_keep: int = _f(2, "Complete backups kept per phase (older ones are deleted).", ge=1)
    monitor: Literal["val_accuracy", "val_loss"] = _f(
        "val_accuracy", "Metric that selects the best model and drives early stopping."
    )
    label_smoothing: float = _f(0.0, "Label smoothing of the cross-entropy loss.", ge=0.0, lt=1.0)
    cache_frozen_features: bool = _f(
        False,
        "A phase with the whole base frozen runs each image through the base once, caches the features on "
        "local scratch disk and trains the head on them (epochs many times faster). Cached images are "
        "unaugmented, so such a phase ignores data.augment; phases that unfreeze blocks are never cached.",
    )


@dataclass
class RuntimeConfig:
    mixed_precision: Literal["auto", "on", "off"] = _f(
        "auto", "mixed_float16 compute: auto = on when training on GPUs, off on CPU."
    )
    jit_compile: bool = _f(False, "Compile the training step with XLA.")
    all_reduce: Literal["auto", "nccl", "ring"] = _f(
        "auto",
        "Multi-worker gradient all-reduce: auto (TensorFlow picks NCCL on GPUs), nccl (GPUs), or ring "
        "(TensorFlow's own ring over gRPC; CPU or GPU).",
    )
    all_reduce_pack_mb: float = _f(
        0.0,
        "Multi-worker: all-reduce the gradients in packs of this many MiB, so communication overlaps "
        "the rest of the step; 0 = TensorFlow decides.",
        ge=0,
    )
    deterministic: bool = _f(False, "Deterministic ops and input order (for tests; slower).")
    seed: int = _f(42, "Seed for weights initialisation, shuffling and augmentation.")
    peer_wait_seconds: float = _f(
        600.0, "Multi-worker: how long a worker waits at start for every peer to answer before giving up.", gt=0
    )
    collective_timeout_seconds: float = _f(
        300.0, "Multi-worker: a collective that takes longer than this fails instead of hanging.", gt=0
    )
    stop_check_every_steps: int = _f(
        10,
        "Multi-worker: the workers agree whether one got SIGTERM at least every this many steps (and at "
        "every epoch end); each check is a two-float all-reduce (a few ms), a stop waits for the next check.",
        ge=1,
    )
    stop_check_seconds: float = _f(
        10.0,
        "Multi-worker: ... and at least this often in seconds when steps are slow (after every step when "
        "one step takes longer). A stop then takes at most this long plus one step and one backup; the "
        "launcher's grace and the chart's terminationGracePeriodSeconds are sized from it.",
        gt=0,
    )
    heartbeat_timeout_seconds: float = _f(
        60.0,
        "Multi-worker: a worker silent this long (dead, frozen, node gone) is declared failed and every "
        "worker stops with an error (exit 75) instead of hanging. Also how long the chief waits for "
        "its peers to exit after the final barrier.",
        gt=0,
    )
    verbose: int = _f(2, "Keras progress output: 0 silent, 1 progress bar, 2 one line per epoch.", ge=0, le=2)


@dataclass
class OutputConfig:
    dir: str = _f("", "Run directory (local path or gs://bucket/prefix): backups, logs, best model, export, summary.")
    evaluation_report: bool = _f(
        True,
        "At the end, run the export's serving signature over the test split (else validation) on every worker "
        "and write evaluation/<split>/evaluation.json and confusion-matrix.png (trainer.report).",
    )
    lease_seconds: float = _f(
        float(DEFAULT_LEASE_SECONDS),
        "The chief holds output.dir with a lease (owner.json) renewed every quarter of this; a lease not "
        "renewed for this long is stale and another run may take it (trainer.train.lease).",
        ge=10,
    )
    lease_wait_seconds: float = _f(
        0.0,
        "How long a run waits for another live run holding output.dir to end before it fails (exit 75). "
        "0 = fail at once; the chart sets terminationGracePeriodSeconds + lease_seconds, so the Job a "
        "`helm upgrade` starts waits for the old Job's pods to stop.",
        ge=0,
    )


@dataclass
class StorageConfig:
    retry_budget_seconds: float = _f(
        120.0, "Seconds one storage operation may spend retrying transient failures (429, 5xx, timeouts).", gt=0
    )
    upload_workers: int = _f(8, "Parallel uploads when `prepare` writes to gs://.", ge=1)


@dataclass
class MonitoringConfig:
    enabled: bool = _f(True, "Serve Prometheus metrics on every worker (started before TensorFlow).")
    port: int = _f(
        METRICS_PORT,
        "Port of the metrics endpoint; 0 = any free port. $TRAINER_METRICS_PORT overrides it (the local "
        "launcher gives each worker its own). The chart's metrics port (container port, liveness probe, "
        "Service, NetworkPolicy, monitors) follows it; the chart refuses 0, ports below 1024 and the worker port.",
        ge=0,
        le=65535,
    )
    address: str = _f(
        "",
        "Address the endpoint listens on; empty = every IPv4 interface (0.0.0.0), :: = IPv6 and IPv4. "
        "In a pod the liveness probe and Prometheus connect to the pod's IP: the chart accepts only these.",
    )
    pushgateway_url: str = _f(
        "",
        "Pushgateway the chief pushes the run's outcome to when it ends, e.g. http://pushgateway:9091; empty = "
        "off. $TRAINER_PUSHGATEWAY_URL overrides it (the chart sets it from a Secret). Credentials "
        "(https://user:password@host) go as basic auth and are left out of logs, summary.json and `trainer config`.",
    )
    pushgateway_job: str = _f("vgg-trainer", "The `job` label of the pushed outcome.")
    curves: bool = _f(True, "The chief draws the training curves into training-curves.png beside summary.json.")


RECIPE_CHOICES = ("auto", "transfer", "scratch", "notebook")


@dataclass
class Config:
    recipe: Literal["auto", "transfer", "scratch", "notebook"] = _f(
        "auto",
        "What trains when, as one setting (see Recipes below); a setting you give always wins over its recipe. "
        "auto = transfer with pretrained weights (imagenet or a file), scratch with model.weights=none.",
    )
    data: DataConfig = _section(DataConfig, "Input data and the tf.data pipeline.")
    prepare: PrepareConfig = _section(PrepareConfig, "How `trainer prepare` turns an image folder into shards.")
    model: ModelConfig = _section(ModelConfig, "The VGG16 model.")
    phases: PhasesConfig = _section(PhasesConfig, "The two training phases.")
    train: TrainConfig = _section(TrainConfig, "Settings shared by both phases.")
    runtime: RuntimeConfig = _section(RuntimeConfig, "Devices, precision and determinism.")
    output: OutputConfig = _section(OutputConfig, "Where results go.")
    storage: StorageConfig = _section(StorageConfig, "Object storage (gs://) behaviour.")
    monitoring: MonitoringConfig = _section(MonitoringConfig, "Metrics endpoint, Pushgateway and training curves.")


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
    missing = [path for path in paths if not _lookup(config, path)]
    if not missing:
        return
    how = " ".join(f"--set {path}={REQUIRED[path]}" for path in missing)
    verb, pronoun = ("is", "it") if len(missing) == 1 else ("are", "them")
    raise ConfigError(f"{' and '.join(missing)} {verb} not set; pass {how}, or set {pronoun} in the --config file")


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config; every problem is reported in one ConfigError.

    The recipe's settings lie under ``raw``: a key given in ``raw`` always wins.
    """
    errors: list[str] = []
    recipe = recipe_of(raw)
    if recipe is not None:
        raw = _merged(recipe_settings(recipe), raw)
    config = _build(Config(), raw, "", errors)
    if not errors:
        errors.extend(_cross_field_errors(config))
    if errors:
        count = f"{len(errors)} configuration problem{'s' if len(errors) > 1 else ''}"
        raise ConfigError(f"{count}: " + "; ".join(errors))
    return config


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
    weights = model.get("weights", ModelConfig.weights) if isinstance(model, dict) else ModelConfig.weights
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


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` applied on top, section by section."""
    result = dict(base)
    for key, value in over.items():
        below = result.get(key)
        result[key] = _merged(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return result


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


def _build(default: Any, raw: Any, path: str, errors: list[str]) -> Any:
    """``default`` (a dataclass instance) with the values of ``raw`` applied and checked.

    Nested sections start from the parent's default, so e.g. fine_tuning keeps its own
    defaults (sgd, block5) when only one of its keys is overridden.
    """
    cls = type(default)
    if not isinstance(raw, dict):
        errors.append(f"{path or 'config'}: expected a mapping, got {_describe(raw)}")
        return default
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            errors.append(_unknown_key_message(str(key), path, list(fields)))
    values = {}
    for name, fld in fields.items():
        if name not in raw:
            continue
        sub_path = f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(getattr(default, name), raw[name], sub_path, errors)
        else:
            values[name] = _convert(hints[name], raw[name], sub_path, fld.metadata, errors)
    return dataclasses.replace(default, **values)


def _unknown_key_message(key: str, path: str, known: list[str]) -> str:
    where = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
    return f"{where}: unknown key; {hint}"


def _convert(hint: Any, value: Any, path: str, meta: Any, errors: list[str]) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads unquoted on/off as booleans
        if value not in choices:
            errors.append(f"{path}: expected one of {', '.join(map(str, choices))}, got {_describe(value)}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {_describe(value)}")
            return []
        return [_convert(item_type, item, f"{path}[{i}]", {}, errors) for i, item in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (meta.get("auto") and value == "auto"):
            return None
        return _convert(args[0], value, path, meta, errors)
    return _convert_scalar(hint, value, path, meta, errors)


def _convert_scalar(hint: type, value: Any, path: str, meta: Any, errors: list[str]) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {_describe(value)}")
            return value
    elif hint is float:
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {_describe(value)}")
            return value
        value = float(value)
        if not math.isfinite(value):  # YAML's .inf/.nan and "inf"/"nan" pass every range check or none
            errors.append(f"{path}: expected a finite number, got {value}")
            return value
    elif hint is str:
        if value is None:
            value = ""
        if isinstance(value, (int, float, datetime.date)) and not isinstance(value, bool):
            value = str(value)  # e.g. output.dir=2024-06-01, which YAML reads as a date
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {_describe(value)}")
        return value
    _check_range(value, path, meta, errors)
    return value


_RANGE_CHECKS = {
    "ge": (">=", lambda v, b: v >= b),
    "gt": (">", lambda v, b: v > b),
    "le": ("<=", lambda v, b: v <= b),
    "lt": ("<", lambda v, b: v < b),
}


def _check_range(value: float, path: str, meta: Any, errors: list[str]) -> None:
    failed = [f"{sym} {meta[k]}" for k, (sym, ok) in _RANGE_CHECKS.items() if k in meta and not ok(value, meta[k])]
    if failed:
        errors.append(f"{path}: must be {' and '.join(failed)}, got {value}")


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"


def _cross_field_errors(config: Config) -> list[str]:
    errors = []
    fe, ft = config.phases.feature_extraction, config.phases.fine_tuning
    if fe.unfreeze_blocks:
        errors.append(
            "phases.feature_extraction.unfreeze_blocks: the base is frozen in feature extraction; "
            "list blocks under phases.fine_tuning.unfreeze_blocks instead"
        )
    for i, block in enumerate(ft.unfreeze_blocks):
        if block not in VGG16_BLOCKS:
            errors.append(
                f"phases.fine_tuning.unfreeze_blocks[{i}]: unknown block {block!r}; "
                f"use one of {', '.join(VGG16_BLOCKS)}"
            )
    if fe.epochs + ft.epochs == 0:
        errors.append("phases: both phases have 0 epochs; set phases.feature_extraction.epochs or fine_tuning.epochs")
    if config.prepare.validation_fraction + config.prepare.test_fraction >= 1.0:
        errors.append("prepare: validation_fraction + test_fraction must leave images for training (sum < 1)")
    weights = config.model.weights
    if not weights:
        errors.append("model.weights: empty; use 'imagenet', 'none' or a path to a .h5 weights file")
    return errors


# --------------------------------------------------------------------------- output


def to_dict(config: Any) -> dict[str, Any]:
    """The configuration as plain data, credentials in URLs removed: what summary.json and
    `trainer config` show (a Pushgateway URL's user:password@ never reaches a file)."""
    return redacted(dataclasses.asdict(config))


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md), generated from the dataclasses."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `trainer config --reference` from `trainer/config.py`; do not edit by hand.",
        "",
        "Set values in a YAML file (`--config run.yaml`) or on the command line",
        "(`--set phases.fine_tuning.epochs=3`). Unknown keys, keys given twice, wrong types and",
        "non-finite numbers (`.inf`, `nan`) are errors.",
        "",
    ]
    lines += _top_level_rows()
    for fld in dataclasses.fields(Config):
        if not dataclasses.is_dataclass(typing.get_type_hints(Config)[fld.name]):
            continue
        lines += _reference_section(
            fld.type if isinstance(fld.type, type) else typing.get_type_hints(Config)[fld.name],
            fld.name,
            fld.metadata["doc"],
            Config(),
        )
    lines += _recipes_markdown()
    return "\n".join(lines) + "\n"


def _top_level_rows() -> list[str]:
    lines = ["## Top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    hints = typing.get_type_hints(Config)
    for fld in dataclasses.fields(Config):
        if not dataclasses.is_dataclass(hints[fld.name]):
            lines.append(
                f"| `{fld.name}` | {_type_name(hints[fld.name])} | `{_yaml_scalar(fld.default)}` | "
                f"{fld.metadata['doc']} |"
            )
    return [*lines, ""]


def _recipes_markdown() -> list[str]:
    lines = [
        "## Recipes",
        "",
        "A recipe is a set of defaults laid under your settings: any key you set wins over it. "
        "`trainer config` prints the result, and a run logs its plan (each automatic choice with its "
        "reason) and stores it in summary.json.",
        "",
    ]
    for name, (why, settings) in RECIPES.items():
        lines += [f"### `{name}`", "", why[0].upper() + why[1:] + ".", ""]
        if not settings:
            lines += ["The defaults in the tables above.", ""]
            continue
        lines += ["| key | value | why |", "|---|---|---|"]
        lines += [f"| `{key}` | `{_yaml_scalar(value)}` | {reason} |" for key, (value, reason) in settings.items()]
        lines.append("")
    return lines


def _reference_section(cls: type, path: str, doc: str, root: Any) -> list[str]:
    lines = [f"## `{path}`", "", doc, "", "| key | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    hints = typing.get_type_hints(cls)
    instance = _lookup(root, path)
    for fld in dataclasses.fields(cls):
        hint = hints[fld.name]
        sub = f"{path}.{fld.name}"
        if dataclasses.is_dataclass(hint):
            nested.append((hint, sub, fld.metadata["doc"]))
            continue
        default = getattr(instance, fld.name)
        shown = "auto" if default is None and fld.metadata.get("auto") else _yaml_scalar(default)
        lines.append(f"| `{sub}` | {_type_name(hint)} | `{shown}` | {fld.metadata['doc']} |")
    lines.append("")
    for hint, sub, sub_doc in nested:
        lines += _reference_section(hint, sub, sub_doc, root)
    return lines


def _lookup(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(hint))
    if origin is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return {int: "integer", float: "number", bool: "boolean", str: "string"}.get(hint, str(hint))


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
