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

