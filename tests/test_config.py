import logging
import re
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


def test_choices_are_declared_once_on_their_fields() -> None:
    import dataclasses

    from clipzss.config import EvalConfig, MethodConfig, choices

    assert choices(MethodConfig, "nel_norm") == ("zegclip", "entries")
    assert choices(EvalConfig, "mode") == ("slide", "whole")
    for section in dataclasses.fields(Config):  # every default is one of its own choices
        values = getattr(Config(), section.name)
        for item in dataclasses.fields(values):
            try:
                allowed = choices(type(values), item.name)
            except TypeError:
                continue
            assert getattr(values, item.name) in allowed, (section.name, item.name)
    with pytest.raises(TypeError):
        choices(MethodConfig, "tau")


@pytest.mark.parametrize(
    "override", ["method.nel_norm=foo", "eval.mode=tiles", "train.amp=fp8", "teacher.precision=int8"]
)
def test_a_choice_outside_its_field_is_one_line_naming_the_field(override: str) -> None:
    from clipzss.config import ConfigValueError

    key, _, value = override.partition("=")
    with pytest.raises(ConfigValueError, match=rf"^{re.escape(key)}='{value}' is not one of \w+"):
        load_config(None, [override])
    section, _, name = key.partition(".")
    cfg = Config()
    setattr(getattr(cfg, section), name, value)  # built in Python: validate() is what train/evaluate call
    with pytest.raises(ConfigValueError, match=rf"^{re.escape(key)}='{value}'"):
        cfg.validate()


def test_cli_choices_read_the_config() -> None:
    from clipzss.cli import build_parser
    from clipzss.config import EvalConfig, choices

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("eval", "predict"):
        mode = next(a for a in commands[command]._actions if a.dest == "mode")
        assert tuple(mode.choices) == choices(EvalConfig, "mode")


def test_help_imports_neither_torch_nor_numpy() -> None:
    import subprocess
    import sys

    code = "import sys; from clipzss.cli import build_parser; build_parser(); print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_eval_options_are_the_equivalent_overrides() -> None:
    from clipzss.cli import parse_args
    from clipzss.cli.eval import config_overrides
    from clipzss.config import apply_overrides

    options = "--dataset voc --data-root /data/voc --split val --unseen cat,dog --mode whole --max-images 3"
    options += " --seen-gamma 0.1 --absent-classes skip --label-candidates 2 --workers 0"
    args = parse_args(["eval", "--baseline", "clearclip", *options.split()])
    base = load_config(None, ["data.eval_dataset=context", "data.eval_root=/data/context"])
    overrides = [
        "data.eval_dataset=null",
        "data.eval_root=null",
        "data.eval_unseen=null",
        "data.dataset=voc",
        "data.root=/data/voc",
        "data.unseen=[cat, dog]",
        "data.num_workers=0",
        "eval.mode=whole",
        "eval.max_images=3",
        "eval.seen_gamma=0.1",
        "eval.absent_classes=skip",
        "eval.label_candidates=2",
    ]
    expected = load_config(None, ["data.eval_dataset=context", "data.eval_root=/data/context", *overrides])
    assert apply_overrides(base, config_overrides(args)) == expected
    # --dataset alone forgets the config's root: the root of another dataset is never used by accident
    alone = apply_overrides(
        base, config_overrides(parse_args(["eval", "--baseline", "sclip", "--dataset", "voc"]))
    )
    assert alone.data.dataset == "voc" and alone.data.root == "" and alone.data.eval_dataset is None
    assert apply_overrides(base, config_overrides(parse_args(["eval", "--baseline", "sclip"]))) == base
