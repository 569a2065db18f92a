"""Damaged files: every kind of file we read, truncated and bit-flipped at seeded offsets.

Each damaged file must either still load (a flip inside tensor data or a JSON string can be
harmless) or raise one of our error types with a message naming the file: never another
exception and never a hang. The counts are printed (`pytest -s`) for the issue's report.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal

import pytest
import torch

from data.records import DataError, load_records
from engine.state import RunStateError, load_trainer_state, read_run_config
from model import CheckpointError, LlamaConfig, LoRAConfig, TokenizerError, load_base
from model.adapter import AdapterError, load_adapter, read_adapter_config, save_adapter
from model.config import ConfigError

OURS = (DataError, RunStateError, CheckpointError, TokenizerError, AdapterError, ConfigError)
# per file and per damage kind (truncate, bit flip); TALLREC_FUZZ_N=200 for a deeper search
N_OFFSETS = int(os.environ.get("TALLREC_FUZZ_N", 12))
TINY = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=96,
                   max_seq_len=64)
LORA = LoRAConfig(r=2, alpha=4, dropout=0.0, targets=["q", "v"])


class Hang(Exception):
    pass


def _alarm(*_):
    raise Hang


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One good file of each kind and the call that reads it."""
    from tests.model_fixtures import hf_reference, write_gguf, write_hf

    root = tmp_path_factory.mktemp("good")
    hf = hf_reference(TINY)
    write_hf(hf, root / "hf")
    write_gguf(hf, TINY, root / "tiny.gguf")
    model, _ = load_base(root / "hf", lora=LORA)
    save_adapter(model, root / "adapter", base_name="tiny")
    rows = [{"instruction": "Given the user's preference and unpreference, identify whether "
                            "the user will like the target movie by answering \"Yes.\" or "
                            "\"No.\".",
             "input": f"User Preference: \"A (1990)\", \"B (1991)\"\nUser Unpreference: "
                      f"\"C (1992)\"\nWhether the user will like the target movie \"D {i}\"?",
             "output": "Yes." if i % 2 else "No."} for i in range(3)]
    (root / "rows.json").write_text(json.dumps(rows, indent=4))
    load_records(root / "rows.json", rec=True)  # the good file is good
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora" in n])
    torch.save({"state": {"step": 3, "epoch": 0}, "optimizer": opt.state_dict(),
                "scaler": {}, "rng": {"torch": torch.get_rng_state()}},
               root / "trainer_state.pt")
    (root / "run").mkdir()
    (root / "run" / "config.json").write_text(json.dumps({"stage": "rt", "lr": 1e-4}))

    def adapter_from(folder):
        read_adapter_config(folder)
        load_adapter(model, folder)

    kinds = {
        "records JSON": (root / "rows.json", lambda p: load_records(p, rec=True)),
        "HF config.json": (root / "hf" / "config.json", lambda p: load_base(p.parent)),
        "HF model.safetensors": (root / "hf" / "model.safetensors",
                                 lambda p: load_base(p.parent)),
        "GGUF": (root / "tiny.gguf", lambda p: load_base(p)),
        "adapter_config.json": (root / "adapter" / "adapter_config.json",
                                lambda p: adapter_from(p.parent)),
        "adapter_model.safetensors": (root / "adapter" / "adapter_model.safetensors",
                                      lambda p: adapter_from(p.parent)),
        "trainer_state.pt": (root / "trainer_state.pt", load_trainer_state),
        "run config.json": (root / "run" / "config.json", lambda p: read_run_config(p.parent)),
    }
    for path, read in kinds.values():
        read(path)  # every good file reads without error
    return kinds


def _damages(data: bytes, seed: int):
    rng = random.Random(seed)
    for _ in range(N_OFFSETS):
        yield "truncate", data[:rng.randrange(len(data))]
    for _ in range(N_OFFSETS):
        i = rng.randrange(len(data))
        yield "bit flip", data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]


KINDS = ["records JSON", "HF config.json", "HF model.safetensors", "GGUF", "adapter_config.json",
         "adapter_model.safetensors", "trainer_state.pt", "run config.json"]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_file_gives_our_error_naming_it(files, kind, tmp_path):
    good, read = files[kind]
    data = good.read_bytes()
    failures, tried = [], 0
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for n, (how, bad) in enumerate(_damages(data, seed=KINDS.index(kind))):
            case = tmp_path / f"case{n}"
            shutil.copytree(good.parent, case)  # the damaged file among its good neighbours
            path = case / good.name
            path.write_bytes(bad)
            tried += 1
            signal.alarm(20)
            try:
                read(path)
            except OURS as e:
                if str(path) not in str(e):
                    failures.append(f"{how} at {len(bad)}: message does not name the file: {e}")
            except Hang:
                failures.append(f"{how} at {len(bad)}: no answer within 20 s")
            except Exception as e:  # noqa: BLE001 - what this test hunts
                failures.append(f"{how} at {len(bad)}: {type(e).__name__}: {e}")
            finally:
                signal.alarm(0)
            shutil.rmtree(case)
    finally:
        signal.signal(signal.SIGALRM, old)
    print(f"fuzz {kind}: {tried} damaged files, {len(failures)} failures")
    assert not failures, "\n".join(failures[:10])
