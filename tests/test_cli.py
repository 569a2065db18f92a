"""The command lines' success path on the default base (SmolLM2-135M): train.py for one step,
then evaluate.py on its run folder; exit codes, printed result lines, files written."""

import json
import re
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def run(*args, timeout=600):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def test_train_then_evaluate_on_the_default_base(tmp_path):
    out = tmp_path / "run"
    # the default base and settings, cut to one 8-sample step on the offline toy domain
    rc, stdout, stderr = run("train.py", "--max-steps", "1", "--val-size", "8", "--domain", "toy",
                             "--shots", "8", "--batch-size", "8", "--micro-batch-size", "8",
                             "--eval-batch-size", "8", "--out", out)
    assert rc == 0, stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["base"] == "smollm2-135m" and config["lora_targets"] == ["q", "v"]
    assert config["max_steps"] == 1 and config["val_size"] == 8
    result = json.loads(re.search(r"^result: (.*)$", stdout, re.M).group(1))
    assert result["steps"] == 1 and result["synthetic_data"] is True
    assert result["best_step"] == 1 and result["adapter"] == str(out / "best")
    assert json.loads((out / "result.json").read_text()) == result
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 1] and "loss" in log[0] and "val_auc" in log[1]
    for folder in ("last", "best"):
        cfg = json.loads((out / folder / "adapter_config.json").read_text())
        assert cfg["r"] == 8 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
        tensors = load_file(out / folder / "adapter_model.safetensors")
        assert len(tensors) == 30 * 2 * 2  # 30 layers, q and v, A and B
    assert (out / "last" / "trainer_state.pt").is_file()
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 1

    rc, stdout, stderr = run("evaluate.py", "--ckpt", out, "--limit", "8", "--no-progress")
    assert rc == 0, stderr[-3000:]
    line = re.search(r"^toy_test: AUC (\S+)  acc (\S+)  log-loss (\S+)  n 8  positives (\d+) "
                     r"\[SYNTHETIC toy data\]  \(\d+s\) -> (\S+)$", stdout, re.M)
    assert line, stdout
    written = Path(line.group(5))
    assert written == out / "eval_toy_test.json"
    res = json.loads(written.read_text())
    assert res["n"] == len(res["probs"]) == 8 and res["ckpt"] == str(out / "best")
    assert res["positives"] == int(line.group(4)) == sum(res["labels"])
    assert line.group(1) == ("undefined" if res["auc"] is None else f"{res['auc']:.4f}")
