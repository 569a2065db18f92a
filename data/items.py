"""Item ids for TALLRec's rec samples, so ID-based baselines can train on the same K shots.

Ids:
- movie: MovieLens-100K ids from u.item (latin-1). u.item lists 18 titles under two ids
  (e.g. "Chasing Amy (1997)" is 246 and 268: the same film entered twice). A record holds
  only the title, so the two cannot be told apart; the title maps to its *smallest* id.
- book, toy: TALLRec's book data carries no ISBNs, so ids are assigned to item strings in
  order of first appearance over the train, valid and test splits (preferences,
  unpreferences, target of each record in file order): stable whatever K or the seed.
- id 0 is reserved for padding. A title not in the vocabulary is a cold item: it gets a
  fresh id (the next free one) the first time it is seen, never an error.

History order: the prompt has lost the interleaving of likes and dislikes (both lists keep
their own chronological order), so a history is the preferences, oldest first, followed by
the unpreferences, oldest first; feedback 1 for a preference, 0 for an unpreference. This is
the order the LLM reads them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data.fewshot import SPLITS, load_domain
from data.movielens import RawFiles, read_items
from data.prompts import parse_rec_record
from paths import data_root as resolve_data_root

PAD = 0


@dataclass
class ItemVocab:
    domain: str
    ids: dict[str, int] = field(default_factory=dict)  # item string -> id (>= 1)
    n_known: int = 0  # ids 1..n_known came from the catalogue; later ones are cold items

    def __post_init__(self) -> None:
        self._size = max(self.ids.values(), default=PAD) + 1

    def __len__(self) -> int:
        """Size of an embedding table indexed by these ids (padding row included)."""
        return self._size

    def id(self, item: str) -> int:
        if item not in self.ids:
            self.ids[item] = self._size  # cold item: next free id
            self._size += 1
        return self.ids[item]

    def is_cold(self, item: str) -> bool:
        return item not in self.ids or self.ids[item] > self.n_known

    def titles(self) -> list[str]:
        """Item string of each id, "" for padding and for ids no title maps to."""
        out = [""] * len(self)  # e.g. movie id 268, the unused twin of 246
        for title, i in self.ids.items():
            out[i] = title
        return out


def movielens_vocab(data_root: Path | str | None = None) -> ItemVocab:
    raw = RawFiles(resolve_data_root(data_root) / "raw" / "ml-100k")
    titles = read_items(*raw.read("u.item"))  # id string -> title
    ids: dict[str, int] = {}
    for sid, title in titles.items():
        i = int(sid)
        ids[title] = min(i, ids.get(title, i))  # duplicated titles: smallest MovieLens id
    return ItemVocab("movie", ids, n_known=max(ids.values()))


def vocab_from_records(domain: str, records: list[dict]) -> ItemVocab:
    vocab = ItemVocab(domain)
    for r in records:
        s = parse_rec_record(r)
        for item in [*s.preferences, *s.unpreferences, s.target]:
            vocab.id(item)
    vocab.n_known = len(vocab) - 1
    return vocab


def domain_vocab(domain: str, data_root: Path | str | None = None) -> ItemVocab:
    if domain == "movie":
        return movielens_vocab(data_root)
    records = [r for split in SPLITS for r in load_domain(domain, split, data_root).records]
    return vocab_from_records(domain, records)


@dataclass(frozen=True)
class IdSample:
    history: list[int]  # item ids: preferences then unpreferences, each oldest first
    feedback: list[int]  # 1 = liked, 0 = disliked, aligned with history
    target: int
    label: int  # 1 = "Yes.", 0 = "No."


def record_to_ids(record: dict, vocab: ItemVocab) -> IdSample:
    s = parse_rec_record(record)
    if s.label is None:
        raise ValueError("record has no label (empty output); baselines need labelled rows")
    history = [vocab.id(t) for t in s.preferences] + [vocab.id(t) for t in s.unpreferences]
    feedback = [1] * len(s.preferences) + [0] * len(s.unpreferences)
    return IdSample(history, feedback, vocab.id(s.target), int(s.label))
