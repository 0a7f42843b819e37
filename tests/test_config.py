"""trainer.config: defaults, YAML + --set loading, validation messages, YAML output, reference docs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from trainer import config as config_lib
from trainer.config import (
    VGG16_BLOCKS,
    Config,
    HeadConfig,
    config_from_dict,
    load_config,
    to_yaml,
)
from trainer.config_docs import reference_markdown
from trainer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def config_error(*, path: str | None = None, overrides: list[str] = (), raw: dict | None = None) -> str:
    """The message of the ConfigError that loading raises (fails the test if none is raised)."""
    with pytest.raises(ConfigError) as info:
        if raw is not None:
            config_from_dict(raw)
        else:
            load_config(path, overrides)
    return str(info.value)


def leaf_paths(data: dict, prefix: str = "") -> list[str]:
    """The dotted path of every setting in ``data`` (a config as plain data)."""
    paths = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        paths += leaf_paths(value, path + ".") if isinstance(value, dict) else [path]
    return paths


# --------------------------------------------------------------------------- defaults


def test_defaults_are_valid_and_documented_values():
    cfg = load_config()

    assert cfg == Config()
    assert cfg.data.image_size == 224
    assert cfg.model.weights == "imagenet"
    assert cfg.train.lr_scaling == "linear"
    fe, ft = cfg.phases["feature_extraction"], cfg.phases["fine_tuning"]
    assert (fe.optimizer.name, fe.optimizer.learning_rate, fe.unfreeze_blocks) == ("adam", 1e-3, [])
    assert (ft.optimizer.name, ft.optimizer.learning_rate, ft.unfreeze_blocks) == ("sgd", 1e-4, ["block5"])


def test_list_defaults_are_not_shared_between_instances():
    first, second = Config(), Config()
    first.model.head.dense_units.append(128)
    first.phases["fine_tuning"].unfreeze_blocks.append("block4")

    assert second.model.head.dense_units == [256]
    assert second.phases["fine_tuning"].unfreeze_blocks == ["block5"]


# --------------------------------------------------------------------------- loading


def test_yaml_file_then_set_overrides_later_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  dataset: /data/flowers\n  image_size: 64\ntrain:\n  batch_size_per_replica: 8\n")

    cfg = load_config(str(path), ["train.batch_size_per_replica=16", "output.dir=/runs/one"])

    assert cfg.data.dataset == "/data/flowers"
    assert cfg.data.image_size == 64
    assert cfg.train.batch_size_per_replica == 16  # --set beats the file
    assert cfg.output.dir == "/runs/one"
    assert cfg.data.shuffle_buffer == 2048  # untouched keys keep their defaults


def test_set_values_are_parsed_as_yaml_scalars_and_lists():
    cfg = load_config(
        overrides=[
            "train.batch_size_per_replica=16",
            "phases.feature_extraction.optimizer.learning_rate=0.01",
            "data.augment.horizontal_flip=false",
            "model.head.dense_units=[512, 128]",
            "phases.fine_tuning.unfreeze_blocks=[block4, block5]",
            "data.dataset=gs://bucket/flowers",
        ]
    )

    assert cfg.train.batch_size_per_replica == 16
    assert cfg.phases["feature_extraction"].optimizer.learning_rate == 0.01
    assert cfg.data.augment.horizontal_flip is False
    assert cfg.model.head.dense_units == [512, 128]
    assert cfg.phases["fine_tuning"].unfreeze_blocks == ["block4", "block5"]
    assert cfg.data.dataset == "gs://bucket/flowers"


def test_integer_given_for_a_float_field_becomes_a_float():
    cfg = load_config(overrides=["data.center_crop_fraction=1"])

    assert cfg.data.center_crop_fraction == 1.0
    assert isinstance(cfg.data.center_crop_fraction, float)


def test_set_learning_rate_in_exponent_notation():
    # PyYAML (YAML 1.1) reads "1e-5" as a string: learning rates are naturally written this way.
    cfg = load_config(overrides=["phases.fine_tuning.optimizer.learning_rate=1e-5"])

    assert cfg.phases["fine_tuning"].optimizer.learning_rate == pytest.approx(1e-5)


@pytest.mark.parametrize("value", ["on", "off", "auto"])
def test_set_mixed_precision_to_each_documented_choice(value):
    # "on" and "off" are YAML 1.1 booleans; the documented choices must still work unquoted.
    cfg = load_config(overrides=[f"runtime.mixed_precision={value}"])

    assert cfg.runtime.mixed_precision == value


def test_overriding_one_nested_key_keeps_the_sections_own_defaults():
    cfg = load_config(overrides=["phases.fine_tuning.epochs=2"])

    ft = cfg.phases["fine_tuning"]
    assert ft.epochs == 2
    assert ft.optimizer.name == "sgd"
    assert ft.optimizer.learning_rate == 1e-4
    assert ft.unfreeze_blocks == ["block5"]
    assert cfg.phases["feature_extraction"] == Config().phases["feature_extraction"]


def test_nested_yaml_section_keeps_defaults_of_keys_it_does_not_name(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("phases:\n  fine_tuning:\n    optimizer:\n      learning_rate: 0.0005\n")

    ft = load_config(str(path)).phases["fine_tuning"]

    assert ft.optimizer.learning_rate == 0.0005
    assert (ft.optimizer.name, ft.optimizer.momentum, ft.unfreeze_blocks) == ("sgd", 0.9, ["block5"])


def test_empty_yaml_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")

    assert load_config(str(path)) == Config()


def test_notebook_recipe_head_is_expressible():
    cfg = load_config(
        overrides=[
            "model.head.pooling=flatten",
            "model.head.dense_units=[256]",
            "model.head.activation=relu",
            "model.head.dropout=0.5",
        ]
    )

    assert cfg.model.head == HeadConfig(pooling="flatten", dense_units=[256], activation="relu", dropout=0.5)


# --------------------------------------------------------------------------- validation


def test_every_field_problem_is_reported_at_once_with_its_path():
    message = config_error(
        raw={
            "train": {"batch_sise_per_replica": 8, "monitor": "accuracy"},
            "data": {"image_size": "big", "center_crop_fraction": 1.5},
            "phases": {"fine_tuning": {"epochs": -1}},
            "model": {"head": {"pooling": "max", "dense_units": 256}},
        }
    )

    assert message.startswith("7 configuration problems: ")
    assert "train.batch_sise_per_replica: unknown key; did you mean 'batch_size_per_replica'?" in message
    assert "train.monitor: expected one of val_accuracy, val_loss, got str 'accuracy'" in message
    assert "data.image_size: expected an integer, got str 'big'" in message
    assert "data.center_crop_fraction: must be <= 1.0, got 1.5" in message
    assert "phases.fine_tuning.epochs: must be >= 0, got -1" in message
    assert "model.head.pooling: expected one of avg, flatten, got str 'max'" in message
    assert "model.head.dense_units: expected a list, got int 256" in message


def test_unknown_top_level_key_suggests_the_close_section():
    message = config_error(overrides=["trian.batch_size_per_replica=8"])

    assert message == "1 configuration problem: trian: unknown key; did you mean 'train'?"


def test_unknown_key_without_close_match_lists_the_known_keys():
    message = config_error(overrides=["output.zzz=1"])

    assert "output.zzz: unknown key; known keys: dir" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.image_size=16", "data.image_size: must be >= 32, got 16"),
        ("data.augment.random_crop=1", "data.augment.random_crop: expected true or false, got int 1"),
        ("train.batch_size_per_replica=true", "train.batch_size_per_replica: expected an integer, got bool True"),
        ("train.batch_size_per_replica=1.5", "train.batch_size_per_replica: expected an integer, got float 1.5"),
        ("runtime.verbose=3", "runtime.verbose: must be <= 2, got 3"),
        ("model.head.dense_units=[64, x]", "model.head.dense_units[1]: expected an integer, got str 'x'"),
        (
            "phases.feature_extraction.optimizer.name=adagrad",
            "phases.feature_extraction.optimizer.name: expected one of sgd, adam, rmsprop, got str 'adagrad'",
        ),
        ("data=5", "data: expected a mapping, got int 5"),
    ],
)
def test_field_problem_messages(override, expected):
    assert expected in config_error(overrides=[override])


def test_bad_block_name_is_reported_with_its_index():
    message = config_error(overrides=["phases.fine_tuning.unfreeze_blocks=[block5, block6]"])

    assert (
        f"phases.fine_tuning.unfreeze_blocks[1]: expected one of {', '.join(VGG16_BLOCKS)}, got str 'block6'" in message
    )


def test_cross_field_problems_are_reported_together():
    message = config_error(
        overrides=[
            "phases.feature_extraction.unfreeze_blocks=[block5]",
            "phases.feature_extraction.epochs=0",
            "phases.fine_tuning.epochs=0",
        ]
    )

    assert message.startswith("2 configuration problems: ")
    assert "phases.feature_extraction.unfreeze_blocks: the base is frozen in feature extraction" in message
    assert "phases: both phases have 0 epochs" in message


def test_xla_over_logical_cpu_devices_of_one_process_is_refused_with_the_fix():
    message = config_error(overrides=["runtime.jit_compile=true", "runtime.cpu_devices=2"])

    assert "\n" not in message
    assert message.startswith("1 configuration problem: runtime.jit_compile: XLA across logical CPU devices")
    assert "set runtime.cpu_devices=1 or runtime.jit_compile=false" in message
    assert load_config(overrides=["runtime.jit_compile=true"]).runtime.cpu_devices == 1  # alone, each is fine
    assert load_config(overrides=["runtime.cpu_devices=2"]).runtime.jit_compile is False


def test_one_phase_with_zero_epochs_is_fine():
    cfg = load_config(overrides=["phases.fine_tuning.epochs=0"])

    assert cfg.phases["fine_tuning"].epochs == 0


def test_validation_and_test_fractions_must_leave_training_images():
    message = config_error(overrides=["prepare.validation_fraction=0.5", "prepare.test_fraction=0.5"])

    assert "prepare: validation_fraction + test_fraction must leave images for training" in message


def test_empty_model_weights_is_an_error():
    assert "model.weights: empty" in config_error(overrides=["model.weights="])


def test_error_message_is_one_line():
    message = config_error(
        raw={
            "train": {"batch_sise_per_replica": 8},
            "data": {"image_size": "big"},
            "phases": {"fine_tuning": {"epochs": -1}},
        }
    )

    assert "\n" not in message
    assert message.count("; ") >= 2


@pytest.mark.parametrize("item", ["train.batch_size_per_replica", "=3"])
def test_set_without_key_value_form_is_a_config_error(item):
    message = config_error(overrides=[item])

    assert message.startswith(f"--set {item!r}: expected key=value")


def test_set_below_a_scalar_is_a_config_error():
    message = config_error(overrides=["output=x", "output.dir=y"])

    assert message == "--set 'output.dir=y': output is not a section"


def test_invalid_yaml_file_is_a_one_line_config_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  dataset: [unclosed\ntrain: {\n")

    message = config_error(path=str(path))

    assert message.startswith(f"config file {path} is not valid YAML: line 3, column 6: ")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A whole section twice: the first one's settings would vanish unseen.
        ("train:\n  steps_per_epoch: 1\nmodel:\n  weights: none\ntrain:\n  backups_to_keep: 3\n",
         "line 5, column 1: key 'train' is given twice (first on line 1)"),
        ("train:\n  steps_per_epoch: 1\n  steps_per_epoch: 2\n",
         "line 3, column 3: key 'steps_per_epoch' is given twice (first on line 2)"),
        ("data: {image_size: 32, image_size: 64}\n", "line 1, column 24: key 'image_size' is given twice"),
    ],
)  # fmt: skip
def test_a_key_given_twice_is_a_config_error_naming_it_and_its_lines(tmp_path, text, expected):
    path = tmp_path / "twice.yaml"
    path.write_text(text)

    message = config_error(path=str(path))

    assert message.startswith(f"config file {path} is not valid YAML: {expected}")
    assert "\n" not in message


def test_a_merge_key_may_still_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        "phases:\n  feature_extraction: &phase {epochs: 2, early_stopping_patience: 1}\n"
        "  fine_tuning:\n    <<: *phase\n    epochs: 3\n"
    )

    cfg = load_config(str(path))

    assert (cfg.phases["fine_tuning"].epochs, cfg.phases["fine_tuning"].early_stopping_patience) == (3, 1)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan", "-Infinity"])
@pytest.mark.parametrize(
    "setting",
    ["phases.fine_tuning.optimizer.learning_rate", "runtime.peer_wait_seconds", "prepare.shard_size_mb",
     "data.staging.budget_gb", "train.label_smoothing"],
)  # fmt: skip
def test_a_float_setting_must_be_finite(setting, value):
    message = config_error(overrides=[f"{setting}={value}"])

    assert re.fullmatch(
        rf"1 configuration problem: {re.escape(setting)}: expected a finite number, got -?(inf|nan)", message
    )


def test_a_non_finite_float_in_a_file_names_the_setting(tmp_path):
    path = tmp_path / "inf.yaml"
    path.write_text("phases:\n  feature_extraction:\n    optimizer:\n      learning_rate: .inf\n")

    message = config_error(path=str(path))

    setting = "phases.feature_extraction.optimizer.learning_rate"
    assert message == f"1 configuration problem: {setting}: expected a finite number, got inf"


def test_yaml_file_that_is_not_a_mapping_is_a_config_error(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- data\n- train\n")

    assert config_error(path=str(path)) == f"config file {path} must hold a mapping of sections, got list"


def test_missing_config_file_is_a_one_line_config_error(tmp_path):
    path = tmp_path / "nope.yaml"

    message = config_error(path=str(path))

    assert message == f"config file {path} not found; pass an existing YAML file to --config"


def test_directory_as_config_file_is_a_config_error(tmp_path):
    # Passing a directory (e.g. a mounted ConfigMap folder) must not end in a traceback.
    message = config_error(path=str(tmp_path))

    assert str(tmp_path) in message
    assert "\n" not in message


# --------------------------------------------------------------------------- output


def test_to_yaml_round_trips_through_load_config(tmp_path):
    cfg = load_config(
        overrides=[
            "data.dataset=gs://bucket/flowers",
            "model.head.pooling=flatten",
            "model.head.dense_units=[]",
            "phases.fine_tuning.unfreeze_blocks=[block3, block4, block5]",
            "phases.fine_tuning.optimizer.learning_rate=0.00001",
            "runtime.deterministic=true",
            "output.dir=/runs/42",
        ]
    )
    path = tmp_path / "effective.yaml"
    path.write_text(to_yaml(cfg))

    assert load_config(str(path)) == cfg


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://pusher:s3cret@push.example:9091/", "https://push.example:9091/"),
        ("http://s3cret@push.example", "http://push.example"),  # a token as the user
        ("pusher:s3cret@push.example:9091", "push.example:9091"),  # no scheme: read as http://
    ],
)
def test_credentials_in_urls_stay_out_of_trainer_config_and_the_summary(url, shown, monkeypatch, capsys):
    from trainer import config as config_lib
    from trainer.cli import main

    monkeypatch.delenv("TRAINER_CONFIG", raising=False)
    code = main(["config", "--set", f"monitoring.pushgateway_url={url}"])
    printed = capsys.readouterr().out
    cfg = load_config(overrides=[f"monitoring.pushgateway_url={url}"])

    assert code == 0
    assert yaml.safe_load(printed)["monitoring"]["pushgateway_url"] == shown
    assert "s3cret" not in printed
    assert cfg.monitoring.pushgateway_url == url  # the trainer keeps them, to push with
    assert config_lib.to_dict(cfg)["monitoring"]["pushgateway_url"] == shown  # summary.json's "config"


def test_urls_without_credentials_are_written_as_given():
    from trainer import config as config_lib

    paths = ["gs://bucket/runs/a@b", "/data/x@y", "a@b/runs"]
    cfg = load_config(overrides=[f"data.dataset={paths[0]}", f"output.dir={paths[1]}"])
    local = load_config(overrides=[f"output.dir={paths[2]}", "monitoring.pushgateway_url=http://push:9091/p@q"])

    assert config_lib.to_dict(cfg)["data"]["dataset"] == paths[0]
    assert config_lib.to_dict(cfg)["output"]["dir"] == paths[1]
    assert config_lib.to_dict(local)["output"]["dir"] == paths[2]
    assert config_lib.to_dict(local)["monitoring"]["pushgateway_url"] == "http://push:9091/p@q"


def test_default_to_yaml_round_trips():
    assert config_from_dict(yaml.safe_load(to_yaml(Config()))) == Config()


def test_reference_mentions_every_leaf_field_path_with_its_default():
    reference = reference_markdown()
    paths = leaf_paths(Config().model_dump())

    assert len(paths) > 40
    for path in paths:
        assert f"| `{path}` |" in reference, path
    assert "| `phases.fine_tuning.optimizer.name` | `sgd` \\| `adam` \\| `rmsprop` | `sgd` |" in reference
    assert "| `model.head.dense_units` | list of integer | `[256]` |" in reference
    assert re.search(r"^## `phases\.fine_tuning\.schedule`$", reference, re.MULTILINE)


def test_docs_configuration_md_is_the_generated_reference():
    committed = (REPO / "docs" / "configuration.md").read_text()

    assert committed == reference_markdown(), "regenerate: trainer config --reference > docs/configuration.md"


def test_an_unknown_phase_name_is_refused_with_a_suggestion():
    message = config_error(overrides=["phases.fine_tunning.epochs=3"])

    assert message == "1 configuration problem: phases.fine_tunning: unknown key; did you mean 'fine_tuning'?"


@pytest.mark.parametrize("recipe", ["transfer", "scratch", "notebook"])
def test_the_printed_json_schema_accepts_each_recipes_configuration_and_refuses_a_bad_value(recipe, capsys):
    import jsonschema

    from trainer.cli import main

    assert main(["config", "--json-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    settings = config_lib.to_dict(load_config(overrides=[f"recipe={recipe}"]))
    del settings["prepare"], settings["data"]["dataset"], settings["output"]["dir"]  # the chart's own values

    jsonschema.validate(settings, schema)
    settings["phases"]["fine_tuning"]["epochs"] = -1
    with pytest.raises(jsonschema.ValidationError, match="-1 is less than the minimum of 0"):
        jsonschema.validate(settings, schema)
