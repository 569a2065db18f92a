"""--preset on the command line: <stage>-<name> from engine.config.PRESETS, flags on top."""

import pytest

from engine.config import PRESETS, config_from_args


def test_rt_cpu_preset_and_overrides():
    cfg = config_from_args(["--stage", "rt", "--preset", "cpu"])
    assert PRESETS["rt-cpu"]["stage"] == "rt"
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.warmup_ratio, cfg.lr_schedule) == \
        (1e-3, 16, 20, 0.1, "linear")
    assert (cfg.val_size, cfg.eval_every_epochs) == (300, 2)
    # 64 shots in steps of 16: 4 steps an epoch, so a validation every 8 steps
    assert cfg.resolved_eval_every(steps_per_epoch=4) == 8
    assert config_from_args(["--preset", "cpu", "--lr", "5e-4"]).lr == 5e-4  # flags win
    assert config_from_args(["--stage", "rt"]).lr == PRESETS["rt"]["lr"]  # no preset: paper's
    with pytest.raises(ValueError, match="no preset 'rt-gpu' for --stage rt"):
        config_from_args(["--stage", "rt", "--preset", "gpu"])



def test_share_prefix_flag_and_runs_saved_before_it(tmp_path):
    """--share-prefix is on by default and --no-share-prefix turns it off; a run whose
    config.json predates the field (it ran rows whole) resumes with it off, and a flag that
    asks otherwise is refused like any changed setting."""
    import json
    from dataclasses import asdict

    from engine.config import TrainConfig

    assert config_from_args([]).share_prefix is True
    assert config_from_args(["--no-share-prefix"]).share_prefix is False
    old = asdict(TrainConfig(out=str(tmp_path)))
    del old["share_prefix"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert config_from_args(["--out", str(tmp_path), "--resume"]).share_prefix is False
    with pytest.raises(ValueError, match=r"share_prefix \(False -> True\)"):
        config_from_args(["--out", str(tmp_path), "--resume", "--share-prefix"])


@pytest.mark.parametrize("name, bad", [("device", "gpu"), ("precision", "fp8"),
                                       ("lr_schedule", "step"), ("step_mode", "sum"),
                                       ("quant", "int3")])
def test_enumerated_settings_refuse_unknown_values(name, bad):
    """each enumerated setting takes exactly its listed values (engine.config.CHOICES, which
    --help and the grid's flags show) and names its flag when given another."""
    from engine.config import CHOICES, TrainConfig
    for ok in CHOICES[name]:
        TrainConfig(stage="rt", **{name: ok})
    with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be one of"):
        TrainConfig(stage="rt", **{name: bad})
