import pytest

from scalegen.config import Config, load_config, schedule_value
from scalegen.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 7\ndistill:\n  name: asd\n")
    cfg = load_config(f, ["train.max_steps=9", "optim.group_lr={grid: 0.05}", "camera.fovy_range=[30, 60]"])
    assert isinstance(cfg, Config)
    assert cfg.train.max_steps == 9 and cfg.distill.name == "asd"
    assert cfg.optim.group_lr == {"grid": 0.05}
    assert cfg.camera.fovy_range == [30.0, 60.0]
    assert cfg.generator.hash_levels == Config().generator.hash_levels  # untouched default


def test_typo_names_key_and_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'.*'train.max_steps'"):
        load_config(None, ["train.max_step=3"])
    # a mistyped section gets its did-you-mean too: the key under the closest section
    with pytest.raises(ConfigError, match=r"unknown config section 'trian' .*did you mean 'train.max_steps'\?"):
        load_config(None, ["trian.max_steps=3"])
    with pytest.raises(ConfigError, match=r"unknown config section 'camra' .*did you mean 'camera.views_per_prompt'"):
        load_config(None, ["camra.views_per_prompt=2"])
    with pytest.raises(ConfigError, match=r"section 'trian' .*did you mean section 'train'\?"):
        load_config(None, ["trian.max_stps=3"])  # both mistyped: the section is still named


def test_wrong_type_and_choice():
    with pytest.raises(ConfigError, match="train.max_steps.*integer"):
        load_config(None, ["train.max_steps=1.5"])
    with pytest.raises(ConfigError, match="distill.name.*one of"):
        load_config(None, ["distill.name=sdss"])
    with pytest.raises(ConfigError, match="train.progress.*true or false"):
        load_config(None, ["train.progress=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.max_steps"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_cross_key_validation():
    with pytest.raises(ConfigError, match="t_range_start"):
        load_config(None, ["distill.t_range_start=[0.9, 0.1]"])


def test_schedule_value():
    assert schedule_value(3.0, 10, 100) == 3.0
    ramp = [10, 0.0, 1.0, 20]
    assert schedule_value(ramp, 5, 100) == 0.0
    assert schedule_value(ramp, 15, 100) == pytest.approx(0.5)
    assert schedule_value(ramp, 25, 100) == 1.0
    assert schedule_value([0, 1.0, 0.0, 0.5], 25, 100) == pytest.approx(0.5)  # fractions of max_steps


def test_config_files_validate():
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"))
    assert files, "configs/ should hold experiment files"
    for f in files:
        load_config(f)


def test_default_yaml_is_the_embedded_default():
    from pathlib import Path

    f = Path(__file__).resolve().parents[1] / "configs" / "oracle" / "default.yaml"
    assert load_config(f).to_dict() == load_config(None).to_dict()
