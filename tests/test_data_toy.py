import pytest
from sklearn.metrics import roc_auc_score

from data.prompts import parse_rec_record
from data.records import validate_record
from data.toy import GENRES, ToyConfig, rule_score, toy_records


@pytest.mark.parametrize("split", ["train", "test"])
def test_labels_are_learnable_from_text(split):
    records = toy_records(split)
    y = [r["output"] == "Yes." for r in records]
    assert 0.4 < sum(y) / len(y) < 0.6  # balanced, so AUC is not flattered by skew
    assert roc_auc_score(y, [rule_score(r) for r in records]) > 0.85


def test_noise_free_rule_is_near_perfect():
    records = toy_records("valid", ToyConfig(noise=0.0))
    y = [r["output"] == "Yes." for r in records]
    assert roc_auc_score(y, [rule_score(r) for r in records]) > 0.97


def test_records_are_valid_short_and_marked():
    for r in toy_records("valid"):
        validate_record(r, "toy", rec=True)
        s = parse_rec_record(r)
        assert 4 <= s.history_len <= 6
        assert s.domain == "toy" and r["synthetic"] is True
        assert "synthetic" in r["instruction"]
        assert s.target.split()[0].lower() in GENRES


def test_seeded_and_splits_differ():
    assert toy_records("train") == toy_records("train")
    assert toy_records("train", ToyConfig(seed=1)) != toy_records("train")
    assert toy_records("valid")[:20] != toy_records("test")[:20]
    assert len(toy_records("train", ToyConfig(sizes=(7, 1, 1)))) == 7


def test_rule_score_by_hand():
    r = {
        "instruction": "",
        "input": 'User Preference: "Robot tale 1", "Robot saga 4"\nUser Unpreference: '
        '"Space tale 1"\nWhether the user will like the target item "Robot quest 2"?',
        "output": "Yes.",
    }
    assert rule_score(r) == 2
    r["input"] = r["input"].replace('target item "Robot', 'target item "Space')
    assert rule_score(r) == -1
