import json

import pytest

from data.prompts import (
    PROMPT_INPUT,
    PROMPT_NO_INPUT,
    RESPONSE_SPLIT,
    RecSample,
    book_item,
    format_prompt,
    instruction_for,
    is_rec_record,
    parse_rec_input,
    parse_rec_record,
)

MOVIE_INSTRUCTION = (
    "Given the user's preference and unpreference, identify whether the user will like the "
    'target movie by answering "Yes." or "No.".'
)


def test_template_equals_alpaca_lora_json(data_root):
    template = json.loads((data_root / "alpaca" / "template_alpaca.json").read_text())
    assert PROMPT_INPUT == template["prompt_input"]
    assert PROMPT_NO_INPUT == template["prompt_no_input"]
    assert RESPONSE_SPLIT == template["response_split"]


def test_format_prompt_picks_template_on_input():
    with_input = format_prompt("Do X.", "some input")
    tail = "### Instruction:\nDo X.\n\n### Input:\nsome input\n\n### Response:\n"
    assert with_input.endswith(tail)
    assert with_input.startswith("Below is an instruction that describes a task, paired with")
    no_input = format_prompt("Do X.", "")
    assert no_input.endswith("### Instruction:\nDo X.\n\n### Response:\n")
    assert "### Input" not in no_input


def test_instructions():
    assert instruction_for("movie") == MOVIE_INSTRUCTION
    assert instruction_for("book") == MOVIE_INSTRUCTION.replace("target movie", "target book")
    assert "synthetic" in instruction_for("toy") and "target item" in instruction_for("toy")
    with pytest.raises(ValueError, match="unknown rec domain"):
        instruction_for("music")


def test_movie_record_by_hand():
    s = RecSample(["A (1990)", "B, The (1991)"], ["C (1992)"], "T (1993)", True, "movie")
    assert s.to_record() == {
        "instruction": MOVIE_INSTRUCTION,
        "input": 'User Preference: "A (1990)", "B, The (1991)"\nUser Unpreference: "C (1992)"\n'
        'Whether the user will like the target movie "T (1993)"?',
        "output": "Yes.",
    }


def test_book_record_by_hand():
    s = RecSample([book_item("Sula", "Toni Morrison")], [], book_item("Q", "Ann"), False, "book")
    r = s.to_record()
    assert r["input"] == (
        'User Preference: "Sula" written by Toni Morrison\nUser Unpreference: \n'
        'Whether the user will like the target book ""Q" written by Ann"?'
    )
    assert r["output"] == "No."
    assert parse_rec_record(r) == s


def test_book_title_with_comma_quote_is_one_item():
    tricky = book_item('Say "Hi", "Bye"', "Dee, Jr.")
    s = RecSample([tricky, book_item("B", "C")], [], book_item("T", "U"), True, "book")
    back = parse_rec_input(s.render_input(), "Yes.")
    assert back.preferences == [tricky, book_item("B", "C")]


@pytest.mark.parametrize("domain", ["movie", "book"])
def test_round_trip_every_shared_row(data_root, domain):
    n = 0
    for split in ("train", "valid", "test"):
        for row in json.loads((data_root / "tallrec" / domain / f"{split}.json").read_text()):
            assert is_rec_record(row)
            sample = parse_rec_record(row)
            assert sample.domain == domain
            assert sample.to_record() == row
            n += 1
    assert n == {"movie": 10_000, "book": 4854}[domain]


def test_shared_movie_rows_have_ten_history_items(data_root):
    rows = json.loads((data_root / "tallrec" / "movie" / "test.json").read_text())
    assert {parse_rec_record(r).history_len for r in rows} == {10}


def test_drop_oldest_trims_front_of_longer_list():
    s = RecSample(["p1", "p2"], ["u1", "u2", "u3"], "t", True, "movie")
    s1 = s.drop_oldest()
    assert (s1.preferences, s1.unpreferences) == (["p1", "p2"], ["u2", "u3"])
    s2 = s1.drop_oldest()  # tie: preferences lose first
    assert (s2.preferences, s2.unpreferences) == (["p2"], ["u2", "u3"])
    assert s.history_len == 5  # the original is untouched
    with pytest.raises(ValueError, match="no history"):
        RecSample([], [], "t", True, "movie").drop_oldest()


@pytest.mark.parametrize(
    "text, match",
    [
        ("User Preference: \"a\"\nWhether the user will like the target movie \"t\"?", "not a"),
        ('User Preference: "a"\nUser Unpreference: \nWhether the user will like the target '
         'song "t"?', "unknown target noun"),
        ('User Preference: a\nUser Unpreference: \nWhether the user will like the target '
         'movie "t"?', "quoted list"),
        ('User Preference: A written by B\nUser Unpreference: \nWhether the user will like the '
         'target book ""T" written by U"?', "written by"),
    ],
)
def test_parse_rejects_malformed_inputs(text, match):
    with pytest.raises(ValueError, match=match):
        parse_rec_input(text, "Yes.")


def test_parse_rejects_bad_output():
    s = RecSample(["a"], [], "t", True, "movie").render_input()
    with pytest.raises(ValueError, match='"Yes." or "No."'):
        parse_rec_input(s, "yes")
