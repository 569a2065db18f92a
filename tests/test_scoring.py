"""engine/scoring.py against independent references: AUC and the other metrics by hand,
P(Yes) against transformers' LlamaForCausalLM on the real SmolLM2, and its direction."""

import math

import numpy as np
import pytest
import torch

from data.collate import TokenizeConfig, encode_all
from data.fewshot import load_domain
from engine.scoring import common_prefix_len, metrics, score
from model import load_base
from tests.references import pairwise_auc


@pytest.mark.parametrize("probs,labels,auc", [
    ([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0], 1.0),
    ([0.1, 0.3, 0.8, 0.9], [1, 1, 0, 0], 0.0),
    # pairs (pos, neg): (.7,.6) (.7,.2) (.4,.6) (.4,.2) (.6,.6) (.6,.2) -> 1+1+0+1+0.5+1 = 4.5/6
    ([0.7, 0.6, 0.4, 0.2, 0.6], [1, 0, 1, 0, 1], 4.5 / 6),
])
def test_metrics_by_hand(probs, labels, auc):
    m = metrics(probs, labels)
    assert m["auc"] == pytest.approx(auc, abs=1e-12) == pairwise_auc(labels, probs)
    p, y = np.array(probs), np.array(labels)
    assert m["accuracy"] == pytest.approx(np.mean((p > 0.5) == (y == 1)))
    ll = -np.mean([math.log(q) if t else math.log(1 - q) for q, t in zip(p, y, strict=True)])
    assert m["log_loss"] == pytest.approx(ll)
    assert (m["n"], m["positives"]) == (len(labels), sum(labels))


def test_metrics_random_cases_against_pair_count():
    rng = np.random.default_rng(0)
    for n in (7, 30, 101):
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        probs = rng.choice(np.linspace(0, 1, 11), n)  # a coarse grid: many ties
        assert metrics(probs, labels)["auc"] == pytest.approx(pairwise_auc(labels, probs))


def answer_ids_from_training(tok, rows) -> tuple[int, int]:
    """The first response token the training labels put after a Yes and after a No prompt:
    what rec-tuning teaches, so what scoring must read."""
    cfg = TokenizeConfig(train_on_inputs=False)
    first = {}
    for r in rows:
        e = encode_all([r], tok, cfg)[0][0]
        first[r["output"]] = next(y for y in e.labels if y != -100)
    return first["Yes."], first["No."]


@pytest.fixture(scope="module")
def smol_rows():
    """Four real movie test prompts of different lengths (padding in a batch), both labels."""
    rows = load_domain("movie", "test").records
    yes = [r for r in rows if r["output"] == "Yes."][:2]
    no = [r for r in rows if r["output"] == "No."][:2]
    return [yes[0], no[0], yes[1], no[1]]


def test_p_yes_matches_transformers_per_row(smol_rows, smollm2):
    model, tok, ref = smollm2
    yes_id, no_id = answer_ids_from_training(tok, smol_rows)
    examples, _ = encode_all(smol_rows, tok, TokenizeConfig(), eval=True)
    assert len({len(e.input_ids) for e in examples}) > 1  # the batch really is padded
    expected = []
    with torch.no_grad():
        for e in examples:  # one row at a time, no padding, no position tricks
            logits = ref(torch.tensor([e.input_ids])).logits[0, -1]
            expected.append(torch.softmax(logits[[yes_id, no_id]], -1)[0].item())
    # 4: one padded batch; 3: two batches, put back in the input order
    for batch_size in (4, 3):
        probs, labels, _, _ = score(model, tok, smol_rows, batch_size=batch_size,
                                    precision=None, progress=False)
        np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-4)
        assert labels.tolist() == [1, 0, 1, 0]


class RaisedAnswer(torch.nn.Module):
    """A model whose logit of one token is raised by `delta` everywhere."""

    def __init__(self, model, token: int, delta: float):
        super().__init__()
        self.inner, self.token, self.delta = model, token, delta

    def forward(self, ids, vocab_rows=None, **kw):
        logits = self.inner(ids, vocab_rows=vocab_rows, **kw).clone()
        rows = list(range(logits.shape[-1])) if vocab_rows is None else list(vocab_rows)
        logits[..., rows.index(self.token)] += self.delta
        return logits


def test_raising_the_yes_logit_raises_the_score(data_root):
    model, tok = load_base("random:tiny-32k", seed=1, dtype=torch.float32,
                           tokenizer=data_root / "tokenizer" / "llama" / "tokenizer.model")
    rows = load_domain("toy", "test").records[:12]
    yes_id, no_id = answer_ids_from_training(tok, rows)
    base = score(model, tok, rows, 5, progress=False)[0]
    up = score(RaisedAnswer(model, yes_id, 2.0), tok, rows, 5, progress=False)[0]
    down = score(RaisedAnswer(model, no_id, 2.0), tok, rows, 5, progress=False)[0]
    assert (up > base).all() and (down < base).all()

    def logit(p):
        return np.log(p) - np.log1p(-p)

    # P(Yes) = sigmoid(l_yes - l_no): the raise moves the log-odds by exactly delta
    np.testing.assert_allclose(logit(up) - logit(base), 2.0, atol=1e-4)
    np.testing.assert_allclose(logit(base) - logit(down), 2.0, atol=1e-4)


def test_batched_scores_equal_each_prompt_alone_in_transformers(tmp_path, data_root):
    """Right-padded, length-sorted batches, the hidden state at each row's own last token and
    only the Yes/No rows of the LM head: P(Yes) must equal softmax(logits[-1][[Yes, No]]) of
    LlamaForCausalLM run on that prompt alone (fp32, so to 1e-5), in the records' order."""
    from model import LlamaConfig
    from tests.model_fixtures import hf_reference, write_hf

    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                      vocab_size=32000, max_seq_len=512)
    hf = hf_reference(cfg, seed=5)
    folder = write_hf(hf, tmp_path / "tiny")
    model, tok = load_base(folder, tokenizer=data_root / "tokenizer" / "llama" / "tokenizer.model")
    records = load_domain("toy", "test").records[:7]
    probs, labels, _, n_tokens = score(model, tok, records, batch_size=3, progress=False)
    examples, _ = encode_all(records, tok, TokenizeConfig(cutoff_len=512), eval=True)
    assert len({len(e.input_ids) for e in examples}) > 2  # padding really happens
    yes, no = tok.answer_token_ids()
    with torch.no_grad():
        ref = [torch.softmax(hf(torch.tensor([e.input_ids])).logits[0, -1, [yes, no]], -1)[0]
               for e in examples]
    torch.testing.assert_close(torch.tensor(probs, dtype=torch.float32), torch.stack(ref),
                               rtol=1e-5, atol=1e-5)
    assert labels.tolist() == [int(r["output"] == "Yes.") for r in records]
    assert n_tokens == sum(len(e.input_ids) for e in examples)


@pytest.mark.parametrize("rows,expected", [
    ([[1, 2, 3, 4], [1, 2, 3, 5]], 3),
    ([[1, 2, 3], [1, 2, 3, 4]], 2),  # the shorter row keeps its last token to score
    ([[7, 2], [8, 2]], 0),
    ([[1, 2, 3]], 2),
    ([], 0),
])
def test_common_prefix_len_by_hand(rows, expected):
    assert common_prefix_len(rows) == expected


def test_shared_prefix_keys_values_give_the_full_forward():
    """Rows = a common 7-token prefix + their own tokens: logits at each row's last token with
    the prefix encoded once must equal the plain forward of the whole rows (fp32, 1e-5)."""
    model, _ = load_base("random:tiny", seed=3, dtype=torch.float32)
    model.eval()
    g = torch.Generator().manual_seed(0)
    head = torch.randint(3, 200, (7,), generator=g).tolist()
    tails = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 2, 9)]
    width = max(len(t) for t in tails)

    def padded(rows, w):
        ids = torch.tensor([r + [0] * (w - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (w - len(r)) for r in rows])
        return ids, mask

    full_ids, full_mask = padded([head + t for t in tails], 7 + width)
    tail_ids, tail_mask = padded(tails, width)
    last_full = torch.tensor([[6 + len(t)] for t in tails])
    last_tail = torch.tensor([[len(t) - 1] for t in tails])
    with torch.no_grad():
        want = model(full_ids, full_mask, logits_at=last_full)
        prefix = model.encode_prefix(torch.tensor([head]))
        got = model(tail_ids, tail_mask, logits_at=last_tail, prefix=prefix)
    assert prefix.length == 7
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="right-padded"):
        model(tail_ids, tail_mask.flip(-1), prefix=prefix)
