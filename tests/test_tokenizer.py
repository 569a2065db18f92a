import pytest

from model import TokenizerError, load_base, load_tokenizer
from model.checkpoint import base_tokenizer, smollm2_path

TEXTS = [
    "Hello world",
    'User Preference: "Toy Story (1995)", "Heat (1995)"\nUser Unpreference: \n'
    'Whether the user will like the target movie "Casino (1995)"?',
    "### Response:\nYes.",
    "Numbers 12345 and 3.14159, emojis 🎬📚, accents café naïve, tabs\tand  spaces",
    "<|im_start|>user\nHi<|im_end|>",
]


def test_llama_sentencepiece(data_root):
    tok = load_tokenizer(data_root / "tokenizer" / "llama" / "tokenizer.model")
    assert tok.vocab_size == 32000 and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.answer_token_ids() == (8241, 3782)
    ids = tok.encode("Hello", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(tok.encode(TEXTS[1], bos=False)) == TEXTS[1]


def test_stories260k_cannot_score_yes_no(data_root):
    _, tok = load_base("stories260k")
    assert tok.vocab_size == 512
    with pytest.raises(TokenizerError, match="'Yes' is not a single token"):
        tok.answer_token_ids()



def test_base_tokenizer_without_weights_is_the_one_load_base_returns(data_root):
    # the experiment ETA reads the tokenizer of a base without loading its weights
    _, tok = load_base("stories260k")
    found = base_tokenizer("stories260k", data_root)
    assert found.vocab_size == tok.vocab_size
    assert [found.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    gguf = base_tokenizer("smollm2-135m")
    ref = load_tokenizer(smollm2_path())
    assert [gguf.encode(t) for t in TEXTS] == [ref.encode(t) for t in TEXTS]
    assert base_tokenizer("random:tiny") is None

@pytest.fixture(scope="module")
def smollm_tok():
    return load_tokenizer(smollm2_path())


def test_smollm2_bpe_matches_transformers(smollm_tok):
    from transformers import AutoTokenizer

    path = smollm2_path()
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert smollm_tok.encode(text, bos=False) == ref.encode(text, add_special_tokens=False)
        assert smollm_tok.decode(smollm_tok.encode(text, bos=False)) == text
    assert smollm_tok.answer_token_ids() == (10539, 5230)
    # SmolLM2 is trained without BOS: bos=True must not invent one
    assert smollm_tok.encode("Hi", bos=True) == smollm_tok.encode("Hi", bos=False)
    assert smollm_tok.encode("Hi", eos=True)[-1] == smollm_tok.eos_id == 2


def test_tokenizer_json_roundtrip(smollm_tok, tmp_path):
    import json

    smollm_tok.tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "add_bos_token": False}))
    tok = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == smollm_tok.encode(text)
    assert tok.eos_id == 2


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        load_tokenizer(bad)
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "x.json")
