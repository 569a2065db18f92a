"""EvalConfig: the one evaluation config evaluate.py and the experiment grid build."""

import pytest

from engine.evaluation import EvalConfig, config_from_args, default_out


@pytest.mark.parametrize("bad, match", [
    (dict(limit=0), "--limit"), (dict(limit=-2), "--limit"), (dict(batch_size=0), "--batch-size"),
    (dict(cutoff_len=0), "--cutoff-len"), (dict(domain="music"), "--domain"),
    (dict(split="dev"), "--split"), (dict(precision="fp8"), "--precision"), (dict(ckpt=""), "ckpt"),
])
def test_bad_values_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        EvalConfig(**bad)


def test_every_field_is_a_flag():
    cfg = config_from_args(["--ckpt", "runs/x", "--domain", "book", "--limit", "7",
                            "--limit-seed", "3", "--batch-size", "4", "--no-progress",
                            "--out", "r.json"])
    assert cfg == EvalConfig(ckpt="runs/x", domain="book", limit=7, limit_seed=3, batch_size=4,
                             progress=False, out="r.json")
    with pytest.raises(SystemExit):
        config_from_args(["--ckpt", "none", "--device", "tpu"])


def test_default_out_sits_beside_the_adapter(tmp_path):
    res = {"name": "movie_test", "ckpt": str(tmp_path / "run" / "best"), "base": "b"}
    assert default_out(res) == tmp_path / "run" / "eval_movie_test.json"
    res["ckpt"] = str(tmp_path / "adapter")
    assert default_out(res) == tmp_path / "adapter" / "eval_movie_test.json"
    zero = {"name": "book_test", "ckpt": "none", "base": "/m/smol.gguf"}
    assert str(default_out(zero)) == "runs/zero_shot/smol_book_test.json"


def test_bf16_on_a_cpu_without_it_warns(data_root, capsys, monkeypatch):
    """evaluate.py --precision bf16 where the CPU would emulate bf16: a warning naming the fix
    on stderr, and the scores still come (a warning, not an error)."""
    import engine.precision
    from engine.evaluation import evaluate

    cfg = EvalConfig(base="random:tiny-32k", domain="toy", limit=4, device="cpu", precision="bf16",
                     tokenizer=str(data_root / "tokenizer" / "llama" / "tokenizer.model"),
                     progress=False, data_root=str(data_root))
    monkeypatch.setattr(engine.precision, "cpu_bf16_support", lambda: (False, "no bf16"))
    assert evaluate(cfg)["n"] == 4
    err = capsys.readouterr().err
    assert "WARNING: --precision bf16" in err and "--precision fp32" in err
    monkeypatch.setattr(engine.precision, "cpu_bf16_support", lambda: (True, "has bf16"))
    evaluate(cfg)
    assert "WARNING" not in capsys.readouterr().err
