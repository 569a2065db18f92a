"""Readers of base checkpoints. Each yields (our parameter name, tensor loader) pairs and a
config, so `model.checkpoint` can fill a model built on the meta device one tensor at a time."""


class CheckpointError(ValueError):
    pass


def permute_rotary(w, n_heads: int):
    """Meta's interleaved rotary layout -> HF's half-split layout, for q/k weights (out, in).

    Meta pairs dims (2i, 2i+1) of each head; HF pairs (i, i + hd/2). This is the permutation
    of HF's `convert_llama_weights_to_hf.py`; llama.cpp applies its inverse when writing GGUF.
    """
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def unpermute_rotary(w, n_heads: int):
    """HF's half-split layout -> Meta's interleaved layout (inverse of `permute_rotary`)."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)
