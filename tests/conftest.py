import os

# Triton reads this when @triton.jit runs, so it must be set before any kernel module is
# imported: kernel tests then run on CPU tensors through the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from data.paths import default_data_root  # noqa: E402

DATA_ROOT = default_data_root()


@pytest.fixture(scope="session")
def data_root():
    if not DATA_ROOT.is_dir():
        pytest.skip(f"shared data not found at {DATA_ROOT} (set TALLREC_DATA to its folder)")
    return DATA_ROOT
