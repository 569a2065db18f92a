"""The CPU presets' schedule fields: warmup as a share of all steps, validation every N
epochs (rt-cpu: 10% warmup, every 2 epochs), checked by hand and through train()."""

import json
from pathlib import Path

import pytest

from engine.config import PRESETS, TrainConfig
from engine.train import get_lr, train


def test_warmup_ratio_by_hand():
    cfg = TrainConfig(lr=1e-3, warmup_ratio=0.1, warmup_steps=99)
    # 80 steps: ceil(8.0) = 8 warmup steps (warmup_steps is ignored), then linear decay to 0.
    assert cfg.resolved_warmup_steps(80) == 8
    assert get_lr(0, 80, cfg) == pytest.approx(1e-3 / 9)
    assert get_lr(7, 80, cfg) == pytest.approx(1e-3 * 8 / 9)
    assert get_lr(8, 80, cfg) == pytest.approx(1e-3)
    assert get_lr(44, 80, cfg) == pytest.approx(1e-3 * (1 - 36 / 72))
    assert cfg.resolved_warmup_steps(81) == 9  # 8.1 rounds up
    assert TrainConfig(warmup_steps=5).resolved_warmup_steps(80) == 5


def test_eval_every_epochs():
    cfg = TrainConfig(eval_every_epochs=2, eval_every=7)
    assert cfg.resolved_eval_every(4) == 8
    with pytest.raises(ValueError, match="steps per epoch"):
        cfg.resolved_eval_every()
    assert TrainConfig(eval_every=7).resolved_eval_every(4) == 7
    with pytest.raises(ValueError, match="warmup-ratio"):
        TrainConfig(warmup_ratio=1.0)


def test_rt_cpu_preset_is_the_known_schedule():
    rt = TrainConfig(**PRESETS["rt-cpu"])
    assert (rt.lr, rt.batch_size, rt.epochs, rt.warmup_ratio, rt.lr_schedule, rt.val_size,
            rt.eval_every_epochs) == (1e-3, 16, 20, 0.1, "linear", 300, 2)
    it = TrainConfig(**PRESETS["it-cpu"])
    assert (it.stage, it.lr, it.cutoff_len, it.epochs, it.lora_r, it.lora_targets) == \
        ("it", 3e-4, 256, 3, 8, ["q", "v"])


def test_train_validates_every_two_epochs(tmp_path, data_root):
    cfg = TrainConfig(stage="rt", base="random:tiny-32k",
                      tokenizer=str(data_root / "tokenizer" / "llama" / "tokenizer.model"),
                      domain="toy", shots=32, val_size=16, lr=3e-3, batch_size=16,
                      micro_batch_size=16, epochs=5, warmup_ratio=0.1, eval_every_epochs=2,
                      patience=0, seed=3, device="cpu", precision="fp32",
                      out=str(tmp_path / "run"), eval_batch_size=16)
    train(cfg, progress=False)
    log = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    # 2 steps per epoch, 10 steps: validations after epochs 2 and 4, and at the last step.
    assert [r["step"] for r in log if "val_auc" in r] == [4, 8, 10]
    lrs = [r["lr"] for r in log if "lr" in r]
    assert lrs[0] == pytest.approx(3e-3 / 2)  # ceil(0.1 * 10) = 1 warmup step
    assert lrs[1] == pytest.approx(3e-3)
