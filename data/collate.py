"""Tokenization, cutoff handling and padded batches for training and Yes/No evaluation.

Sequence layout: [bos] prompt-tokens response-tokens [eos], labels aligned with input_ids
(not shifted; the model/loss shifts, as HF's causal-LM loss does). Labels are -100 on
padding always and on the prompt when train_on_inputs is False (TALLRec trains with it on).

Cutoff (TALLRec: cutoff_len, 512 in its scripts) never removes the question or the answer:
- rec rows lose their oldest history items one at a time (RecSample.drop_oldest: the front
  of the longer list) until the whole sequence fits;
- Alpaca rows have their input (else instruction) text cut at the end, so the template and
  the full response survive; only when the response alone cannot fit do we fall back to
  alpaca-lora's plain right truncation (no EOS once the cutoff is hit).
Each case is counted in CutoffStats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from data.prompts import NO, YES, format_prompt, is_rec_record, parse_rec_record

# label of positions that carry no loss (prompt, padding): torch's cross_entropy ignore_index
IGNORE_INDEX = -100


class Tokenizer(Protocol):
    """What model/tokenizer.py provides; encode adds bos only when the model uses one."""

    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class TokenizeConfig:
    cutoff_len: int = 512
    train_on_inputs: bool = True
    add_eos: bool = True
    min_history: int = 1  # a rec prompt keeps at least this many history items, else error

    def __post_init__(self) -> None:
        if self.cutoff_len < 8:
            raise ValueError(f"cutoff_len too small: {self.cutoff_len}")
        if self.min_history < 0:
            raise ValueError("min_history must be >= 0")


@dataclass
class CutoffStats:
    examples: int = 0
    history_dropped: int = 0  # rec rows that lost history items
    items_dropped: int = 0  # history items removed in total
    input_truncated: int = 0  # Alpaca rows whose input/instruction text was cut
    response_truncated: int = 0  # Alpaca rows cut alpaca-lora style (response damaged)

    def summary(self, rec: bool | None = None) -> str:
        """rec=True: the rec counters only (an rt run has no Alpaca rows); False: the Alpaca
        ones only; None: all."""
        parts = [f"{self.examples} rows"]
        if rec is not False:
            parts.append(f"{self.history_dropped} rec rows lost {self.items_dropped} history items")
        if rec is not True:
            parts += [f"{self.input_truncated} Alpaca inputs cut",
                      f"{self.response_truncated} Alpaca responses cut"]
        return "; ".join(parts)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int  # tokens before the first response token (bos included)
    label: int | None = None  # 1 Yes / 0 No for rec rows, else None
    dropped_items: int = 0
    truncated: bool = False  # Alpaca text was cut


def pad_value(tok: Tokenizer) -> int:
    # SentencePiece LLaMA has no pad piece (pad_id -1); TALLRec pads with 0 (unk). The value
    # is never attended to, it only has to be a valid embedding row.
    return tok.pad_id if tok.pad_id is not None and tok.pad_id >= 0 else 0


def encode_pair(tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids with bos, response ids) such that the concatenation encodes the text."""
    prompt_ids = tok.encode(prompt, bos=True, eos=False)
    full = tok.encode(prompt + response, bos=True, eos=False)
    if full[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full[len(prompt_ids) :]
    # A merge across the boundary: keep the prompt's own tokens so an eval prompt ends
    # exactly where the answer starts.
    return prompt_ids, tok.encode(response, bos=False, eos=False)


def _labels(ids: list[int], prompt_len: int, train_on_inputs: bool) -> list[int]:
    if train_on_inputs:
        return list(ids)
    return [IGNORE_INDEX] * min(prompt_len, len(ids)) + ids[prompt_len:]


def _fit_rec(record: dict, tok: Tokenizer, cfg: TokenizeConfig, response: str):
    sample = parse_rec_record(record)
    eos = 1 if cfg.add_eos else 0
    dropped = 0
    while True:
        prompt = format_prompt(record["instruction"], sample.render_input())
        p, r = encode_pair(tok, prompt, response)
        if len(p) + len(r) + eos <= cfg.cutoff_len:
            return p, r, dropped
        if sample.history_len <= cfg.min_history:
            raise ValueError(
                f"rec prompt does not fit cutoff_len={cfg.cutoff_len} even with "
                f"{sample.history_len} history item(s) ({len(p) + len(r) + eos} tokens)"
            )
        sample = sample.drop_oldest()
        dropped += 1


def _fit_alpaca(record: dict, tok: Tokenizer, cfg: TokenizeConfig):
    """(prompt ids, response ids, eos fits, kind) where kind is '', 'input' or 'response'."""
    eos = 1 if cfg.add_eos else 0
    instruction, inp = record["instruction"], record["input"]
    p, r = encode_pair(tok, format_prompt(instruction, inp), record["output"])
    over = len(p) + len(r) + eos - cfg.cutoff_len
    if over <= 0:
        return p, r, True, ""
    key = "input" if inp else "instruction"
    field_ids = tok.encode(record[key], bos=False, eos=False)
    keep = len(field_ids) - over
    # Re-tokenizing a cut text can shift a token or two, hence the loop.
    while keep > 0:
        cut = {"instruction": instruction, "input": inp, key: tok.decode(field_ids[:keep])}
        p, r = encode_pair(tok, format_prompt(cut["instruction"], cut["input"]), record["output"])
        if len(p) + len(r) + eos <= cfg.cutoff_len:
            return p, r, True, "input"
        keep -= max(1, len(p) + len(r) + eos - cfg.cutoff_len)
    # The response alone is too long: alpaca-lora's tokenizer(truncation=True, max_length).
    p, r = encode_pair(tok, format_prompt(instruction, inp), record["output"])
    full = (p + r)[: cfg.cutoff_len]
    return p[: cfg.cutoff_len], full[len(p) :], len(full) < cfg.cutoff_len, "response"


def encode_record(
    record: dict, tok: Tokenizer, cfg: TokenizeConfig, stats: CutoffStats | None = None
) -> Example:
    """A training example: prompt + response (+ eos), fitted to cfg.cutoff_len."""
    stats = stats if stats is not None else CutoffStats()
    stats.examples += 1
    label = None
    kind = ""
    if is_rec_record(record):
        p, r, dropped = _fit_rec(record, tok, cfg, record["output"])
        eos_fits = True
        label = {YES: 1, NO: 0}.get(record["output"])
        if dropped:
            stats.history_dropped += 1
            stats.items_dropped += dropped
    else:
        p, r, eos_fits, kind = _fit_alpaca(record, tok, cfg)
        dropped = 0
        stats.input_truncated += kind == "input"
        stats.response_truncated += kind == "response"
    ids = p + r + ([tok.eos_id] if cfg.add_eos and eos_fits else [])
    return Example(
        input_ids=ids,
        labels=_labels(ids, len(p), cfg.train_on_inputs),
        prompt_len=len(p),
        label=label,
        dropped_items=dropped,
        truncated=bool(kind),
    )


def encode_eval(
    record: dict, tok: Tokenizer, cfg: TokenizeConfig, stats: CutoffStats | None = None
) -> Example:
    """A Yes/No eval example: input_ids end exactly where the answer starts.

    History is dropped until prompt + answer (+ eos) fits, the same budget as training, so
    an example scores the same prompt it would train on.
    """
    if not is_rec_record(record):
        raise ValueError("eval examples need a rec row (Yes./No. output)")
    if record["output"] not in (YES, NO):
        raise ValueError(f'eval row output must be "Yes." or "No.", got {record["output"]!r}')
    stats = stats if stats is not None else CutoffStats()
    stats.examples += 1
    p, _, dropped = _fit_rec(record, tok, cfg, record["output"])
    if dropped:
        stats.history_dropped += 1
        stats.items_dropped += dropped
    return Example(
        input_ids=p,
        labels=[],
        prompt_len=len(p),
        label=int(record["output"] == YES),
        dropped_items=dropped,
    )


def encode_all(
    records: list[dict], tok: Tokenizer, cfg: TokenizeConfig, eval: bool = False
) -> tuple[list[Example], CutoffStats]:
    stats = CutoffStats()
    fn = encode_eval if eval else encode_record
    return [fn(r, tok, cfg, stats) for r in records], stats


def _pad(rows: list[list[int]], value: int, width: int, left: bool) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _width(rows: list[list[int]], multiple: int | None) -> int:
    width = max(len(r) for r in rows)
    if multiple:
        width = -(-width // multiple) * multiple
    return width


def collate_train(
    examples: list[Example],
    pad_id: int,
    side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels: (B, T) long, padded to the longest row."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not examples:
        raise ValueError("empty batch")
    left = side == "left"
    ids = [e.input_ids for e in examples]
    width = _width(ids, pad_to_multiple_of)
    return {
        "input_ids": _pad(ids, pad_id, width, left),
        "attention_mask": _pad([[1] * len(r) for r in ids], 0, width, left),
        "labels": _pad([e.labels for e in examples], IGNORE_INDEX, width, left),
    }


def collate_eval(
    examples: list[Example], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Left-padded prompts whose last position predicts the answer.

    input_ids, attention_mask: (B, T); labels: (B,) 1 Yes / 0 No. The model derives RoPE
    positions from the mask, so a left-padded row sees the same positions as when run alone.
    """
    if not examples:
        raise ValueError("empty batch")
    ids = [e.input_ids for e in examples]
    width = _width(ids, pad_to_multiple_of)
    mask = _pad([[1] * len(r) for r in ids], 0, width, True)
    return {
        "input_ids": _pad(ids, pad_id, width, True),
        "attention_mask": mask,
        "labels": torch.tensor([e.label for e in examples], dtype=torch.long),
    }
