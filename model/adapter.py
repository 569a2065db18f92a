"""LoRA adapters on disk in PEFT's format, and merged full models in Hugging Face's.

An adapter folder is `adapter_config.json` + `adapter_model.safetensors` (or the older
`adapter_model.bin`, as alpaca-lora / TALLRec stage 1 wrote it), keyed the way PEFT keys a
LoRA'd `LlamaForCausalLM`:
    ours  layers.0.self_attn.q_proj.lora_a
    PEFT  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
so `peft.PeftModel.from_pretrained` reads what `save_adapter` writes and `load_adapter` reads
what `save_pretrained` writes. Loading checks everything before copying anything: an adapter
either loads whole or raises one `AdapterError` naming what does not match; no LoRA weight is
ever left at its initial value.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from fileio import atomic_write, atomic_write_json, make_dir
from model.formats.hf import config_to_hf
from model.lora import TARGETS, LoRAConfig, LoRAError, LoRALinear, lora_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model.model."
# PEFT key of one LoRA factor; older PEFT versions kept the adapter name (`lora_A.default`).
_PEFT_KEY = re.compile(r"(layers\.\d+\.\w+\.\w+)\.lora_([AB])(?:\.default)?\.weight")
# PEFT LoRA features that change the maths or the set of trained tensors, and the value that
# means "off". An adapter using any of them would load here as a different model.
_UNSUPPORTED = {"use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
                "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
                "layers_to_transform": None, "layer_replication": None, "lora_bias": False,
                "trainable_token_indices": None, "target_parameters": None,
                "use_qalora": False, "alora_invocation_tokens": None, "exclude_modules": None}


class AdapterError(LoRAError):
    pass


def peft_key(name: str) -> str:
    """`layers.0.self_attn.q_proj.lora_a` -> PEFT's key for it."""
    module, _, leaf = name.rpartition(".")
    return f"{PEFT_PREFIX}{module}.lora_{leaf[-1].upper()}.weight"


def our_key(key: str) -> str | None:
    """PEFT's key -> ours; None for a key that is not a LoRA factor of a decoder layer."""
    m = _PEFT_KEY.fullmatch(key.removeprefix(PEFT_PREFIX))
    return f"{m[1]}.lora_{m[2].lower()}" if m else None


def _save_json(obj: dict, path: Path):
    atomic_write_json(path, obj, newline=True)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path):
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write(tmp: Path):
        try:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        except SafetensorError as e:
            # safetensors reports OS errors as text ("IoError(Os { code: 28, ...})"): turn
            # them back into an OSError so the caller says "no space left" in one line.
            code = re.search(r"code: (\d+)", str(e))
            errno_ = int(code[1]) if code else errno.EIO
            raise OSError(errno_, os.strerror(errno_)) from None

    atomic_write(path, write)


def adapter_config(lora: LoRAConfig, base_name: str | None = None) -> dict:
    """PEFT's `adapter_config.json` for this LoRA (the fields peft needs, off-values included
    so no peft default can turn a feature on)."""
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": lora.r, "lora_alpha": alpha, "lora_dropout": lora.dropout,
        "target_modules": [TARGETS[t] for t in lora.targets], "inference_mode": True,
        "init_lora_weights": True, "layers_pattern": None, "revision": None,
        **_UNSUPPORTED,
    }


def _model_lora(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    modules = lora_modules(model)
    if not modules or getattr(model, "lora_cfg", None) is None:
        raise AdapterError(f"{what}: the model has no LoRA layers; build it with "
                           f"load_base(..., lora=LoRAConfig(...))")
    return modules


def save_adapter(model: nn.Module, folder: str | Path, base_name: str | None = None) -> Path:
    """Write the model's adapter as a PEFT folder; `base_name` goes to base_model_name_or_path
    (the base spec or hub name the adapter was trained on)."""
    folder = Path(folder)
    modules = _model_lora(model, f"save_adapter({folder})")
    tensors = {}
    for name, m in modules.items():
        for leaf in ("lora_a", "lora_b"):
            t = getattr(m, leaf)
            if t.is_meta:
                raise AdapterError(f"save_adapter: {name}.{leaf} is on the meta device")
            tensors[peft_key(f"{name}.{leaf}")] = t.detach().to("cpu").contiguous()
    make_dir(folder)
    # Weights first: a crash between the two writes leaves no config for a mismatched file.
    _save_safetensors(tensors, folder / ADAPTER_WEIGHTS)
    _save_json(adapter_config(model.lora_cfg, base_name), folder / ADAPTER_CONFIG)
    return folder


def read_adapter_config(folder: str | Path) -> tuple[LoRAConfig, str | None]:
    """-> (the LoRAConfig to build the model with, base_model_name_or_path)."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not folder.is_dir():
        raise AdapterError(f"adapter folder not found: {folder}")
    if not path.is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: cannot read ({e})") from e
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        kind = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise AdapterError(f"{path}: peft_type {kind!r} is not a LoRA adapter")
    used = [f"{k}={cfg[k]!r}" for k, off in _UNSUPPORTED.items()
            if cfg.get(k) not in (off, None, {}, [], False)]
    if used:
        raise AdapterError(f"{path}: uses PEFT features this engine does not implement: "
                           f"{', '.join(used)}")
    targets = cfg.get("target_modules")
    if targets == "all-linear":  # PEFT: every linear layer but the output head
        targets = list(TARGETS.values())
    elif isinstance(targets, str):  # PEFT reads a string as a regex over module names
        targets = [targets] if targets in TARGETS.values() else None
    if not targets:
        raise AdapterError(f"{path}: target_modules {cfg.get('target_modules')!r} is not a "
                           f"list of module names (among {', '.join(TARGETS.values())})")
    try:
        lora = LoRAConfig(r=cfg["r"], alpha=cfg["lora_alpha"],
                          dropout=cfg.get("lora_dropout") or 0.0, targets=list(targets))
    except KeyError as e:
        raise AdapterError(f"{path}: missing key {e}") from e
    except (LoRAError, TypeError) as e:
        raise AdapterError(f"{path}: {e}") from e
    return lora, cfg.get("base_model_name_or_path")


def _read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    path = folder / ADAPTER_WEIGHTS
    if path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), path
        except (SafetensorError, OSError) as e:
            raise AdapterError(f"{path}: corrupt or truncated safetensors file ({e})") from e
    path = folder / ADAPTER_BIN
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for bad pickles; keep the cause
            raise AdapterError(f"{path}: cannot load as a weights-only checkpoint "
                               f"({type(e).__name__}: {e})") from e
        if not isinstance(state, dict):
            raise AdapterError(f"{path}: holds a {type(state).__name__}, not a state dict")
        return state, path
    raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS} or {ADAPTER_BIN}")


def _layers(names) -> set[int]:
    return {int(n.split(".")[1]) for n in names if n.startswith("layers.")}


def _some(names, k: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:k]) + (f" (+{len(names) - k} more)" if len(names) > k else "")


def load_adapter(model: nn.Module, folder: str | Path):
    """Copy a PEFT LoRA adapter into a model built with a matching LoRAConfig (rank, alpha and
    target modules must match; dropout is the model's own, it does not change the weights)."""
    folder = Path(folder)
    lora, _ = read_adapter_config(folder)
    modules = _model_lora(model, f"load_adapter({folder})")
    if any(m.merged for m in modules.values()):
        raise AdapterError(f"load_adapter({folder}): the model's LoRA is merged; unmerge first")
    have = model.lora_cfg
    diffs = [f"{what} {a} (adapter) vs {b} (model)" for what, a, b in (
        ("rank r", lora.r, have.r), ("lora_alpha", lora.alpha, have.alpha),
        ("target modules", lora.targets, have.targets)) if a != b]
    if diffs:
        raise AdapterError(f"{folder}: adapter does not match the model: {'; '.join(diffs)}")

    state, path = _read_tensors(folder)
    params = {f"{name}.{leaf}": getattr(m, leaf)
              for name, m in modules.items() for leaf in ("lora_a", "lora_b")}
    loaded, extra = {}, []
    for key, t in state.items():
        name = our_key(key)
        if name is None or name not in params:
            extra.append(key)
        else:
            loaded[name] = t
    missing = sorted(set(params) - set(loaded))
    if missing or extra:
        ours, theirs = _layers(params), _layers(loaded) | _layers(filter(None, map(our_key, extra)))
        hint = ""
        if theirs and ours != theirs:
            hint = (f" The adapter has layers {min(theirs)}..{max(theirs)}, the model "
                    f"{min(ours)}..{max(ours)}: it belongs to a different base model.")
        elif not state:
            hint = " The file holds no tensors (an empty save, as some peft versions made)."
        parts = [f"{len(missing)} missing ({_some(map(peft_key, missing))})" if missing else "",
                 f"{len(extra)} unexpected ({_some(extra)})" if extra else ""]
        raise AdapterError(f"{path}: adapter keys do not match the model's LoRA layers: "
                           f"{'; '.join(filter(None, parts))}.{hint}")
    bad = [f"{peft_key(n)} {tuple(t.shape)} vs {tuple(params[n].shape)}"
           for n, t in sorted(loaded.items()) if t.shape != params[n].shape]
    if bad:
        raise AdapterError(
            f"{path}: adapter tensor shapes (adapter vs model) differ: {_some(bad, 3)}. "
            f"A different rank, or a base model with other hidden sizes.")
    nonfinite = [peft_key(n) for n, t in loaded.items()
                 if t.is_floating_point() and not torch.isfinite(t).all()]
    if nonfinite or any(not t.is_floating_point() for t in loaded.values()):
        raise AdapterError(f"{path}: non-finite or non-float adapter tensors: "
                           f"{_some(nonfinite) or 'integer dtype'}")
    with torch.no_grad():
        for name, t in loaded.items():
            params[name].copy_(t)  # copy_ casts (fp16 adapters into fp32 parameters)


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None):
    """The model's weights with each LoRA delta folded in, in HF key names, the model itself
    untouched. Tied embeddings appear once (as `model.embed_tokens.weight`)."""
    modules = lora_modules(model)
    out = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        module, _, leaf = name.rpartition(".")
        if leaf in ("lora_a", "lora_b"):
            continue
        if p.is_meta:
            raise AdapterError(f"export: {name} is on the meta device (no weights to export)")
        t = p.detach()
        m = modules.get(module)
        if m is not None and leaf == "weight" and not m.merged:
            t = t.float() + m.delta_weight()  # merge in fp32, round once
        t = t.to(dtype=dtype or p.dtype, device="cpu").contiguous()
        out[name if name == "lm_head.weight" else f"model.{name}"] = t
    return out


def export_merged(model: nn.Module, folder: str | Path, tokenizer=None,
                  dtype: torch.dtype | None = None) -> Path:
    """Write the merged model as an HF folder (`config.json` + `model.safetensors`, and the
    tokenizer's files if given) that `load_base` and `LlamaForCausalLM.from_pretrained` read."""
    folder = Path(folder)
    state = merged_state_dict(model, dtype)
    cfg = config_to_hf(model.cfg)
    cfg["torch_dtype"] = str(state["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    make_dir(folder)
    _save_safetensors(state, folder / "model.safetensors")
    if tokenizer is not None:
        _save_tokenizer(tokenizer, folder)
    _save_json(cfg, folder / "config.json")  # last: config.json marks the folder complete
    return folder


def _save_tokenizer(tok, folder: Path):
    from model.tokenizer import BPETokenizer, SentencePieceTokenizer

    if isinstance(tok, SentencePieceTokenizer):
        atomic_write(folder / "tokenizer.model", lambda p: shutil.copyfile(tok.name, p))
        return
    if not isinstance(tok, BPETokenizer):
        raise AdapterError(f"export: cannot save a {type(tok).__name__}")
    atomic_write(folder / "tokenizer.json", lambda p: tok.tok.save(str(p)))
    special = {"eos_token": tok.eos_id, "pad_token": tok.pad_id}
    if tok.bos_id is not None:
        special["bos_token"] = tok.bos_id
    cfg = {k: tok.tok.id_to_token(i) for k, i in special.items()}
    cfg["add_bos_token"] = tok.bos_id is not None
    _save_json(cfg, folder / "tokenizer_config.json")
