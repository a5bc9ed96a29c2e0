"""Config loading, overrides and validation errors (no Ray)."""

from __future__ import annotations

import pytest
import yaml
from pydantic import create_model

from engine.config import CONFIG_DIR, PipelineConfig, apply_override, config_from_dict, load_config
from engine.errors import ConfigError


def test_default_config_is_the_digits_demo():
    cfg = load_config()
    assert cfg.name == "digits" and cfg.data.source == "digits" and cfg.cluster.k == 10
    assert cfg.model.name == "mlp_ae" and cfg.train.num_workers == 1


def test_every_shipped_config_validates():
    files = sorted(CONFIG_DIR.glob("*.yaml"))
    assert files
    for f in files:
        assert isinstance(load_config(f), PipelineConfig), f


def test_config_by_name_and_overrides():
    cfg = load_config("digits", ["cluster.k=12", "train.use_gpu=false", "model.hidden=[8, 4]", "ray.address=null"])
    assert cfg.cluster.k == 12 and cfg.train.use_gpu is False and cfg.model.hidden == [8, 4]
    assert cfg.ray.address is None


def test_override_switches_source_and_validates_its_settings():
    cfg = load_config(None, ["data.source=blobs", "data.n_samples=50", "data.n_features=3", "cluster.k=5"])
    assert cfg.data.source == "blobs" and cfg.data.n_samples == 50
    # Keys of the old source do not leak into the new one... unless the user set them, which is an error.
    with pytest.raises(ConfigError, match=r"unknown key 'data.images'"):
        config_from_dict({"data": {"source": "blobs", "images": ["a"]}})


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["cluster.k=7"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg and again.hash() == cfg.hash()
    assert load_config(None, ["cluster.k=8"]).hash() != cfg.hash()


def test_hash_ignores_settings_left_at_their_defaults_so_an_added_setting_keeps_old_runs_resumable():
    cfg = load_config(None)
    # The schema gains a setting whose default keeps the old behaviour: the same config hashes as before.
    grown = create_model("GrownConfig", __base__=PipelineConfig, new_setting=(int, 0))
    assert grown(**cfg.to_dict()).hash() == cfg.hash()
    assert grown(**cfg.to_dict(), new_setting=1).hash() != cfg.hash()
    assert load_config(None, ["train.placement_strategy=SPREAD"]).hash() != cfg.hash()
    # Tracking never changes results; a nested setting does; the source's tag counts even with every
    # other data setting at its default.
    assert load_config(None, ["tracking.backend=tensorboard"]).hash() == cfg.hash()
    assert load_config(None, ["train.augment.rotation=10"]).hash() != cfg.hash()
    assert load_config(None, ["data.source=blobs"]).hash() != cfg.hash()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"clutser": {}}, r"unknown key 'clutser'"),
        ({"cluster": {"kk": 3}}, r"unknown key 'cluster.kk'"),
        ({"cluster": {"k": "ten"}}, r"'cluster.k': Input should be a valid integer"),
        ({"cluster": {"k": 0}}, r"'cluster.k': Input should be greater than or equal to 1"),
        ({"train": {"lr": -1}}, r"'train.lr': Input should be greater than 0"),
        ({"train": {"use_gpu": "maybe"}}, r"'train.use_gpu': .*valid boolean.* or .*'auto' \(got 'maybe'\)$"),
        ({"data": {"source": "csv"}}, r"'data.source' must be one of digits, blobs, parquet, npy, idx; got 'csv'"),
        ({"data": {"source": "parquet"}}, r"missing key 'data.path'"),
        ({"data": {"source": "blobs", "n_sample": 5}}, r"unknown key 'data.n_sample'"),
        ({"data": {"source": "blobs", "n_samples": 5}}, r"cluster.k=10 should be <= data.n_samples=5"),
        ({"name": "a b"}, r"'name'"),
        ({"train": {"steps": 0}}, r"'train.steps': Input should be greater than or equal to 1"),
        ({"model": {"name": "vade"}, "train": {"steps": 100}}, r"train.steps=100: vade counts its .* in epochs"),
    ],
)
def test_bad_settings_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_train_steps_become_epochs_over_the_rows():
    from engine.config import TrainConfig

    assert TrainConfig(steps=35, batch_size=128).epochs_for(1797) == 3  # 15 batches an epoch: 45 steps, not 30
    assert TrainConfig(steps=30, batch_size=128).epochs_for(1797) == 2
    assert TrainConfig(steps=11_000, batch_size=256).epochs_for(70_000) == 41  # 274 batches an epoch
    assert TrainConfig(steps=11_000, batch_size=256).epochs_for(10_000) == 275
    assert TrainConfig(steps=5, batch_size=256).epochs_for(100_000) == 1  # at least one whole epoch
    assert TrainConfig(epochs=7).epochs_for(10) == 7  # no steps: the epochs as set
    # steps decide over a recipe's epochs (digits.yaml sets 50); epochs given as an override clear a recipe's steps.
    assert load_config(None, ["train.steps=500"]).train.epochs_for(1797) == 18
    recipe = {"train": {"steps": 500, "batch_size": 64}}
    assert config_from_dict(recipe).train.epochs_for(1797) == 18
    assert config_from_dict(recipe, ["train.epochs=4"]).train.epochs_for(1797) == 4
    assert config_from_dict(recipe, ["train.epochs=4", "train.steps=60"]).train.epochs_for(1797) == 3
    # The resolved config a run saves (both keys) reads back to the same schedule.
    cfg = config_from_dict(recipe)
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())).train.epochs_for(1797) == 18


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: nope.yaml"):
        load_config("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: the top level must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"override 'cluster.k' should look like section.key=value"):
        load_config(None, ["cluster.k"])
    with pytest.raises(ConfigError, match=r"'cluster.k' is not a section"):
        apply_override({"cluster": {"k": 3}}, "cluster.k.x=1")


def test_override_values_are_parsed_as_yaml():
    data: dict = {}
    for item in ["a.b=12", "a.c=true", "a.d=[1, 2]", "a.e=null", "a.f=hello", "a.g=1e-3"]:
        apply_override(data, item)
    assert data == {"a": {"b": 12, "c": True, "d": [1, 2], "e": None, "f": "hello", "g": 1e-3}}
    assert yaml.safe_load(yaml.safe_dump(data)) == data


def test_embed_auto_follows_the_gpus():
    """`embed.batch_size` / `embed.concurrency: auto` resolve per stage: CPU defaults, or one actor per GPU with
    larger batches; explicit numbers are kept; anything else is refused naming the key."""
    from engine.config import CPU_EMBED_ACTORS, CPU_EMBED_BATCH, GPU_EMBED_BATCH, EmbedConfig

    auto = EmbedConfig()
    assert auto.plan(0) == (CPU_EMBED_BATCH, CPU_EMBED_ACTORS)
    assert auto.plan(4) == (GPU_EMBED_BATCH, 4) and auto.plan(0.5) == (GPU_EMBED_BATCH, 1)
    assert EmbedConfig(batch_size=100, concurrency=3).plan(8) == (100, 3)
    with pytest.raises(ValueError, match="concurrency"):
        EmbedConfig(concurrency="many")
    with pytest.raises(ValueError, match="batch_size"):
        EmbedConfig(batch_size=0)
