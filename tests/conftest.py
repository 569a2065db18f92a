import os

# Triton reads this when @triton.jit runs, so it must be set before any kernel module is
# imported: kernel tests then run on CPU tensors through the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Under pytest-xdist (the README's `-n 2`, one worker per core) each worker and the processes
# its tests start compute on one thread: two workers fill two cores without oversubscribing.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from paths import data_root  # noqa: E402

DATA_ROOT = data_root()


@pytest.fixture(scope="session")
def data_root():
    if not DATA_ROOT.is_dir():
        pytest.skip(f"shared data not found at {DATA_ROOT} (set TALLREC_DATA to its folder)")
    return DATA_ROOT


@pytest.fixture(scope="session")
def smollm2():
    """(our SmolLM2-135M in fp32, its tokenizer, transformers' LlamaForCausalLM read from the
    same GGUF): loaded once for every test that compares against the real default base."""
    import torch
    from transformers import LlamaForCausalLM

    from model import load_base
    from model.checkpoint import smollm2_path

    model, tok = load_base("smollm2-135m", dtype=torch.float32)
    path = smollm2_path()
    ref = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                           dtype=torch.float32).eval()
    return model.eval(), tok, ref


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is as fast, and fairer to a shared 2-core machine.
    Subprocesses the module starts need OMP_NUM_THREADS=1 to match it bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
