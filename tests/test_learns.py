"""Rec-tuning learns: a short run on the default base lifts validation AUC from far below
chance to near 1, through the whole product path (prompts, tokens, labels, loss, LoRA
gradients, optimizer, saved best adapter, Yes/No scoring). Swapped labels, a loss that misses
the answer, an optimizer that does not step or scoring that reads P(No) each fail it.

The task is the toy domain's prompts (data/toy.py) with targets of two genres and one rule for
every user: "space" items are liked, "pirate" items are not. The toy's own per-user rule needs
a history-to-target match and takes minutes to learn (measured on 2 idle cores, SmolLM2-135M:
validation AUC 0.58 after 48 steps of 4 rows; a four-of-eight-genres rule gave 0.62-0.81 after
64 steps of 2 rows, depending on the seed). This one, measured over seeds 0-5: AUC 0.217
before, 1.000 after 32-64 steps of 2 rows at lr 3e-3; about 35 s.
"""

import dataclasses
import json

import torch
from sklearn.metrics import roc_auc_score

from data.toy import toy_samples
from engine.config import TrainConfig
from engine.scoring import score
from engine.train import train
from model import load_base

LIKED, DISLIKED = "space", "pirate"


def _records(split: str, n: int) -> list[dict]:
    out = [dataclasses.replace(s, label=s.target.startswith(LIKED.capitalize())).to_record()
           for s in toy_samples(split)
           if s.target.startswith((LIKED.capitalize(), DISLIKED.capitalize()))]
    assert len(out) >= n
    return out[:n]


def test_rec_tuning_raises_validation_auc(tmp_path):
    train_rows, val_rows = _records("train", 64), _records("valid", 64)
    labels = [r["output"] == "Yes." for r in val_rows]
    assert 20 < sum(labels) < 44  # both answers, roughly even
    (tmp_path / "train.json").write_text(json.dumps(train_rows))
    (tmp_path / "valid.json").write_text(json.dumps(val_rows))
    cfg = TrainConfig(stage="rt", domain="toy", data=str(tmp_path / "train.json"),
                      val_data=str(tmp_path / "valid.json"), shots=64, val_size=-1,
                      batch_size=2, micro_batch_size=2, lr=3e-3, max_steps=32, warmup_steps=2,
                      eval_every=32, patience=0, train_on_inputs=False, seed=0,
                      out=str(tmp_path / "run"))

    model, tok = load_base(cfg.base, dtype=torch.bfloat16)
    before = roc_auc_score(labels, score(model, tok, val_rows, progress=False)[0])
    del model
    after = train(cfg, progress=False)["best_val_metric"]
    assert before < 0.5, before  # the base leans the wrong way (0.217 measured) ...
    assert after > 0.9, (before, after)  # ... and 32 steps of 2 rows turn it round (1.0)
