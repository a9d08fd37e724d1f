import logging
from pathlib import Path

import pytest
import yaml

from clipzss.checkpoint import validate_loaded_config
from clipzss.config import Config, ConfigError, load_config


def test_defaults_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = Config()
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert again.teacher.templates == cfg.teacher.templates


def test_overrides_are_typed() -> None:
    cfg = load_config(
        None, ["train.lr=1e-4", "method.glm=false", "data.unseen=car,tree", "eval.max_images=3"]
    )
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.method.glm is False
    assert cfg.data.unseen == ["car", "tree"]
    assert cfg.eval.max_images == 3
    assert load_config(None, ["data.ratio_range=[1.0, 1.5]"]).data.ratio_range == (1.0, 1.5)


def test_unknown_key_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'max_iters'"):
        load_config(None, ["train.max_iter=10"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(None, ["trian.lr=1"])


def test_bad_values_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.max_iters: expected an integer"):
        load_config(None, ["train.max_iters=abc"])
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        load_config(None, ["lr=3"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["teacher.templates=[a {}.]"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_a_removed_key_of_older_versions_is_dropped_with_a_debug_line(tmp_path: Path, caplog) -> None:
    """eval.batch_size was never used and is gone; run folders and checkpoints of older versions still load."""
    old = Config().to_dict()
    old["eval"]["batch_size"] = 1
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    with caplog.at_level(logging.DEBUG, logger="clipzss.config"):
        assert load_config(path) == Config()
    assert "eval.batch_size" in caplog.text and caplog.records[0].levelno == logging.DEBUG
    assert validate_loaded_config(old, "old.safetensors") == Config()  # the path of every checkpoint
    assert old["eval"]["batch_size"] == 1  # the caller's mapping is left as it was
    with pytest.raises(ConfigError, match="unknown config key 'batch_sizes'"):
        load_config(None, ["eval.batch_sizes=1"])  # only the known removed key is dropped
