"""Tokenizers behind one interface: SentencePiece (LLaMA-1/2, stories260K) and byte-level BPE
(SmolLM2, Llama-3), the latter read from a `tokenizer.json` or from GGUF metadata.

`encode(text, bos=True)` adds BOS only if the model was trained with one (SmolLM2 was not).
"""

from __future__ import annotations

from pathlib import Path


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """Common interface; subclasses set the ids and implement `_encode` / `decode`."""

    name: str = "tokenizer"
    vocab_size: int
    bos_id: int | None  # None: the model uses no BOS token
    eos_id: int
    pad_id: int

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self._encode(text)
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def answer_token_ids(self, yes: str = "Yes", no: str = "No") -> tuple[int, int]:
        """Single-token ids of the answers as they follow a prompt ending in a newline.

        Scoring reads P(yes) from the logits of exactly these two tokens, so an answer that
        splits into several tokens cannot be scored: fail loudly rather than score a prefix.
        """
        prefix = self.encode("\n", bos=False)
        out = []
        for word in (yes, no):
            ids = self.encode("\n" + word, bos=False)
            rest = ids[len(prefix):]
            if ids[: len(prefix)] != prefix or len(rest) != 1:
                pieces = [self.decode([i]) for i in rest]
                raise TokenizerError(
                    f"{self.name}: answer {word!r} is not a single token after a newline "
                    f"(it encodes as {rest} = {pieces}); this tokenizer cannot score Yes/No "
                    f"with one forward pass. Use a base model whose vocabulary has it.")
            out.append(rest[0])
        return out[0], out[1]


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str | Path):
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a valid SentencePiece model ({e})") from e
        self.name = str(path)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id()
        # LLaMA's tokenizer has no pad piece; pad positions are always masked, and alpaca-lora
        # pads with id 0 (<unk>), so do the same.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


class BPETokenizer(Tokenizer):
    """Byte-level BPE through the `tokenizers` library."""

    def __init__(self, tok, name: str, bos_id: int | None, eos_id: int, pad_id: int | None):
        self.tok = tok
        self.name = name
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = eos_id if pad_id is None else pad_id

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    @classmethod
    def from_json(cls, path: str | Path) -> BPETokenizer:
        import json

        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a bare Exception on parse errors
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from e
        # Special tokens live in tokenizer_config.json beside it, when there is one.
        bos = eos = pad = None
        add_bos = False
        cfg_path = path.parent / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())

            def tid(key):
                v = cfg.get(key)
                v = v.get("content") if isinstance(v, dict) else v
                return tok.token_to_id(v) if v else None

            bos, eos, pad = tid("bos_token"), tid("eos_token"), tid("pad_token")
            add_bos = bool(cfg.get("add_bos_token", False))
        if eos is None:
            raise TokenizerError(f"{path}: no eos_token found (needs tokenizer_config.json)")
        return cls(tok, str(path), bos if add_bos else None, eos, pad)

    @classmethod
    def from_gguf_fields(cls, f: dict, name: str) -> BPETokenizer:
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        kind = f.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(f"{name}: GGUF tokenizer model {kind!r} is not byte-level BPE")
        tokens = f["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"]]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        pre = f.get("tokenizer.ggml.pre", "gpt2")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre == "smollm":
            # SmolLM's own tokenizer.json splits every digit before the GPT-2 regex.
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in ("llama-bpe", "llama3"):
            pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre in ("gpt2", "default"):
            tok.pre_tokenizer = byte_level
        else:
            raise TokenizerError(f"{name}: unsupported GGUF pre-tokenizer {pre!r}")
        tok.decoder = decoders.ByteLevel()
        types = f.get("tokenizer.ggml.token_type")
        if types is not None:
            # Control tokens (type 3) must match whole, never be split by BPE.
            special = [tokens[i] for i, t in enumerate(types) if int(t) == 3]
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in special])
        add_bos = bool(f.get("tokenizer.ggml.add_bos_token", False))
        bos = f.get("tokenizer.ggml.bos_token_id")
        return cls(tok, name, int(bos) if (add_bos and bos is not None) else None,
                   int(f["tokenizer.ggml.eos_token_id"]),
                   f.get("tokenizer.ggml.padding_token_id"))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.model`, a `tokenizer.json`, a `.gguf` file, or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return load_tokenizer(ggufs[0])
        raise TokenizerError(f"{path}: no tokenizer.model, tokenizer.json or .gguf in this folder")
    if not path.is_file():
        raise TokenizerError(f"tokenizer not found: {path}")
    if path.suffix == ".json":
        return BPETokenizer.from_json(path)
    if path.suffix == ".gguf":
        from model.formats.gguf import read_gguf_metadata

        return BPETokenizer.from_gguf_fields(read_gguf_metadata(path), str(path))
    return SentencePieceTokenizer(path)
