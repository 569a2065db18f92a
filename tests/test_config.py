"""Training presets on the command line, warmup as a fraction, validation every k epochs."""

import pytest

from engine.config import PRESETS, config_from_args
from engine.train import get_lr


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


def test_warmup_ratio_then_linear_decay():
    """80 steps, 10% warmup: 8 warmup steps rising as lr*(s+1)/9, then linear decay to 0
    over the remaining 72 (values by hand)."""
    cfg = config_from_args(["--preset", "cpu", "--lr", "9e-4"])
    assert cfg.resolved_warmup_steps(80) == 8 and cfg.resolved_warmup_steps(75) == 8  # rounded up
    assert get_lr(0, 80, cfg) == pytest.approx(1e-4)
    assert get_lr(7, 80, cfg) == pytest.approx(8e-4)
    assert get_lr(8, 80, cfg) == pytest.approx(9e-4)
    assert get_lr(44, 80, cfg) == pytest.approx(9e-4 * 36 / 72)
    assert get_lr(79, 80, cfg) == pytest.approx(9e-4 / 72)
    with pytest.raises(ValueError, match="--warmup-ratio"):
        config_from_args(["--warmup-ratio", "1.5"])
