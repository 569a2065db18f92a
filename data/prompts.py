"""Prompt text: the Alpaca-LoRA template and TALLRec's rec-tuning instruction and input.

Item strings are stored the way they read inside the quotes of the target: a movie is its
title, a book is `"Title" written by Author`. The history lists then quote movies but not
books (the book item already starts with a quote), while the target is always wrapped in
one more pair of quotes; this is exactly what TALLRec's released files contain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Identical to template_alpaca.json (tests compare); embedded so the package works without
# the shared data. TALLRec's own finetune_rec.py inlines these strings with a stray lint
# comment pasted inside the first line; we follow the JSON template, not that slip.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
RESPONSE_SPLIT = "### Response:"

YES, NO = "Yes.", "No."

# domain -> (noun in the instruction and the question, history items are quoted)
DOMAINS: dict[str, tuple[str, bool]] = {
    "movie": ("movie", True),
    "book": ("book", False),
    "toy": ("item", True),
}
# Said in the toy instruction so a toy prompt can never pass for real data.
TOY_NOTE = " (synthetic toy data)"


def instruction_for(domain: str) -> str:
    noun, _ = _domain(domain)
    note = TOY_NOTE if domain == "toy" else ""
    return (
        f"Given the user's preference and unpreference, identify whether the user will like "
        f'the target {noun}{note} by answering "Yes." or "No.".'
    )


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt up to and including "### Response:\\n"; the answer follows directly."""
    # Alpaca-LoRA picks the template on truthiness of input: "" means no input.
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def book_item(title: str, author: str) -> str:
    return f'"{title}" written by {author}'


def _domain(domain: str) -> tuple[str, bool]:
    if domain not in DOMAINS:
        raise ValueError(f"unknown rec domain {domain!r}; known: {sorted(DOMAINS)}")
    return DOMAINS[domain]


@dataclass
class RecSample:
    preferences: list[str]
    unpreferences: list[str]
    target: str
    label: bool | None  # None for an unlabelled query
    domain: str
    # Positions in time are lost once history is split into two lists; both lists keep
    # their chronological order (oldest first), which is what truncation relies on.
    extra: dict = field(default_factory=dict)  # passed through to the record (e.g. synthetic)

    def __post_init__(self) -> None:
        _domain(self.domain)

    @property
    def history_len(self) -> int:
        return len(self.preferences) + len(self.unpreferences)

    def render_input(self) -> str:
        noun, quoted = _domain(self.domain)
        wrap = (lambda s: f'"{s}"') if quoted else (lambda s: s)
        pref = ", ".join(wrap(s) for s in self.preferences)
        unpref = ", ".join(wrap(s) for s in self.unpreferences)
        return (
            f"User Preference: {pref}\nUser Unpreference: {unpref}\n"
            f'Whether the user will like the target {noun} "{self.target}"?'
        )

    def to_record(self) -> dict:
        output = "" if self.label is None else (YES if self.label else NO)
        record = {
            "instruction": instruction_for(self.domain),
            "input": self.render_input(),
            "output": output,
        }
        record.update(self.extra)
        return record

    def drop_oldest(self) -> RecSample:
        """One history item fewer: the oldest of the longer list (preferences on a tie).

        Trimming the longer list keeps both kinds of evidence for as long as possible, and
        the front of each list is its oldest item, the least relevant to the next rating.
        """
        pref, unpref = list(self.preferences), list(self.unpreferences)
        if not pref and not unpref:
            raise ValueError("no history left to drop")
        if len(pref) >= len(unpref):
            pref.pop(0)
        else:
            unpref.pop(0)
        return RecSample(pref, unpref, self.target, self.label, self.domain, dict(self.extra))


_INPUT_RE = re.compile(
    r"\AUser Preference: (?P<pref>.*)\nUser Unpreference: (?P<unpref>.*)\n"
    r'Whether the user will like the target (?P<noun>\w+) "(?P<target>.*)"\?\Z',
    re.S,
)
_BOOK_ITEM_RE = re.compile(r'\A".*" written by .*\Z', re.S)


def _split_items(body: str, quoted: bool) -> list[str]:
    if not body:
        return []
    if quoted:
        # Movie titles carry no double quotes (checked on all of u.item), so '", "' only
        # ever separates items.
        if not (body.startswith('"') and body.endswith('"')):
            raise ValueError(f"history list is not a quoted list: {body[:80]!r}")
        return body[1:-1].split('", "')
    # Book items: split before each ', "' and glue back pieces that are not a whole
    # '"Title" written by Author' (titles may themselves contain ', "').
    items: list[str] = []
    for piece in re.split(r', (?=")', body):
        if items and not _BOOK_ITEM_RE.match(items[-1]):
            items[-1] += ", " + piece
        else:
            items.append(piece)
    bad = [s for s in items if not _BOOK_ITEM_RE.match(s)]
    if bad:
        raise ValueError(f"not a '\"Title\" written by Author' item: {bad[0][:80]!r}")
    return items


def parse_rec_input(input: str, output: str = "", domain: str | None = None) -> RecSample:
    """Inverse of RecSample.render_input (domain is read from the question if not given)."""
    m = _INPUT_RE.match(input)
    if m is None:
        raise ValueError(f"not a TALLRec rec input: {input[:80]!r}")
    noun = m["noun"]
    if domain is None:
        by_noun = {n: d for d, (n, _) in DOMAINS.items()}
        if noun not in by_noun:
            raise ValueError(f"unknown target noun {noun!r} in rec input")
        domain = by_noun[noun]
    expected_noun, quoted = _domain(domain)
    if noun != expected_noun:
        raise ValueError(f"input asks about a {noun!r}; domain {domain!r} wants {expected_noun!r}")
    if output not in (YES, NO, ""):
        raise ValueError(f'rec output must be "Yes." or "No.", got {output!r}')
    label = None if output == "" else output == YES
    return RecSample(
        _split_items(m["pref"], quoted),
        _split_items(m["unpref"], quoted),
        m["target"],
        label,
        domain,
    )


def parse_rec_record(record: dict) -> RecSample:
    sample = parse_rec_input(record["input"], record.get("output", ""))
    if record.get("instruction") != instruction_for(sample.domain):
        raise ValueError(f"unexpected rec instruction: {record.get('instruction')!r}")
    sample.extra = {k: v for k, v in record.items() if k not in ("instruction", "input", "output")}
    return sample


def is_rec_record(record: dict) -> bool:
    return record.get("instruction") in {instruction_for(d) for d in DOMAINS}
