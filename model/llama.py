"""A LLaMA decoder written out plainly: RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU, blocks, model.

Module and parameter names follow Hugging Face's `LlamaForCausalLM` without the `model.`
prefix (`layers.0.self_attn.q_proj.weight`), so checkpoints and PEFT adapters map by name.
Rotary embeddings use HF's half-split convention; Meta and GGUF checkpoints are permuted into
it when loaded (see `model/formats/`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from kernels.cpu_bf16 import attention, linear
from model.config import LlamaConfig
from model.lora import Linear, LoRAConfig, make_linear
from model.ops import rms_norm, swiglu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)  # statistics in fp32 (model/ops.py)


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponent)  # (head_dim/2,)


def precompute_rope(positions: torch.Tensor, head_dim: int, theta: float, dtype):
    """cos/sin tables for integer positions (B, T) -> two (B, 1, T, head_dim) tensors."""
    inv_freq = rope_inv_freq(head_dim, theta, positions.device)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, head_dim/2), fp32
    emb = torch.cat((freqs, freqs), dim=-1)  # half-split layout: dims i and i+hd/2 pair up
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    # x: (B, n_heads, T, head_dim); rotate each (x_i, x_{i+hd/2}) pair by its angle.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv_heads, T, hd) -> (B, n_kv_heads * n_rep, T, hd) for grouped-query attention."""
    if n_rep == 1:
        return x
    B, H, T, D = x.shape
    return x[:, :, None].expand(B, H, n_rep, T, D).reshape(B, H * n_rep, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, lora: LoRAConfig | None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = make_linear(cfg.dim, q_out, "q", lora)
        self.k_proj = make_linear(cfg.dim, kv_out, "k", lora)
        self.v_proj = make_linear(cfg.dim, kv_out, "v", lora)
        self.o_proj = make_linear(q_out, cfg.dim, "o", lora)

    def forward(self, x, cos, sin, mask, past=None, keep=None):
        """`past`: a shared prefix's (keys, values), batch 1, attended before x's tokens;
        `keep`: a list that receives this call's (keys, values) (when encoding a prefix)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, H, T, hd)
        if keep is not None:
            keep.append((k, v))
        if past is not None:
            k = torch.cat((past[0].expand(B, -1, -1, -1), k), dim=2)
            v = torch.cat((past[1].expand(B, -1, -1, -1), v), dim=2)
        n_rep = self.n_heads // self.n_kv_heads
        # CPU flash attention reads grouped K/V itself: no n_rep-fold copies, and no sum of
        # their gradients in backward. CUDA's efficient kernel (padded batches) cannot.
        gqa = n_rep > 1 and x.device.type == "cpu"
        if not gqa:
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        kw = {"enable_gqa": True} if gqa else {}
        if mask is None:  # causal alone: SDPA takes its fastest (flash) kernel
            y = attention(q, k, v, is_causal=True, **kw)
        else:
            y = attention(q, k, v, attn_mask=mask, **kw)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig, lora: LoRAConfig | None):
        super().__init__()
        self.gate_proj = make_linear(cfg.dim, cfg.hidden_dim, "gate", lora)
        self.up_proj = make_linear(cfg.dim, cfg.hidden_dim, "up", lora)
        self.down_proj = make_linear(cfg.hidden_dim, cfg.dim, "down", lora)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, lora: LoRAConfig | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, lora)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg, lora)

    def forward(self, x, cos, sin, mask, past=None, keep=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, past, keep)
        return h + self.mlp(self.post_attention_layernorm(h))


def _to_host(t: torch.Tensor):
    # Pinned memory lets the device-to-host copy run asynchronously on the current stream:
    # the allocator reuses the device memory only after the copy, which is ordered before it.
    # On CPU this is a plain copy, so the caller's tensor is still released.
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
    host.copy_(t, non_blocking=t.is_cuda)
    return t.device, host


def _to_device(packed) -> torch.Tensor:
    device, host = packed
    return host.to(device, non_blocking=True)


def offload_to_host() -> saved_tensors_hooks:
    """Tensors saved for backward inside this context live in host memory until backward
    reads them (unsloth's offloaded gradient checkpointing, written as saved-tensor hooks like
    torch.autograd.graph.save_on_cpu). Around a non-reentrant `checkpoint`, the only tensors
    saved under these hooks are the block's positional inputs (its inner activations go to
    checkpoint's own, innermost hooks), and they come back just before the block is
    recomputed: the device holds one block input at a time instead of one per block."""
    return saved_tensors_hooks(_to_host, _to_device)


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is real tokens then padding (or no padding at all). Causal attention alone is
    then exact for every real query: the padding keys all come after it."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def build_attention_mask(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From a (B, T) 1/0 padding mask, the positions (B, T) and the SDPA mask (B, 1, T, T).

    Positions count real tokens only, so a left-padded row gets the rotary angles it would get
    alone. Every query may also see itself: a padding query would otherwise attend to nothing
    and turn into NaN (its output is never used, but NaN would leak into gradients).
    """
    valid = attention_mask.bool()
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    mask = causal & (valid[:, None, :] | eye)  # (B, T_q, T_k)
    return positions, mask[:, None]


@dataclass
class PrefixKV:
    """Keys (after RoPE) and values of a prompt prefix, one (1, n_kv_heads, P, head_dim) pair
    per layer. The LoRA weights are part of them: encode again after the adapter changes."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig, lora: LoRAConfig | None = None):
        super().__init__()
        self.cfg, self.lora_cfg = cfg, lora
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, lora) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Gradient checkpointing: recompute every k-th block in backward (0 = off, 1 = all);
        # with checkpoint_offload, those blocks' inputs wait in host memory until then.
        self.checkpoint_every = 0
        self.checkpoint_offload = False

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      prefix: PrefixKV | None = None, keep: list | None = None):
        """Final-norm hidden states (B, T, dim): what the LM head (or a chunked loss) reads.

        `prefix`: the keys/values of tokens every row shares in front of `input_ids` (see
        `encode_prefix`); the rows then hold only their own tokens, right-padded, at positions
        P.. . `keep`: a list that receives each layer's (keys, values)."""
        B, T = input_ids.shape
        P = prefix.length if prefix is not None else 0
        if P + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {P + T} exceeds max_seq_len {self.cfg.max_seq_len}")
        x = self.embed_tokens(input_ids)  # (B, T, dim)
        if prefix is not None:
            if attention_mask is not None and not right_padded(attention_mask):
                raise ValueError("a shared prefix needs right-padded rows")
            # Every query sees the whole prefix, then its own row causally: (1, 1, T, P + T).
            positions = torch.arange(P, P + T, device=x.device).expand(B, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            seen = torch.ones(T, P, dtype=torch.bool, device=x.device)
            mask = torch.cat((seen, causal), dim=1)[None, None]
        elif attention_mask is None or right_padded(attention_mask):
            # Right padding (training batches): positions 0.. and the causal flag are exact
            # for real tokens; padding queries see earlier padding too, but nothing reads
            # them (their labels are -100), so no (B, 1, T, T) mask is built.
            positions, mask = torch.arange(T, device=x.device).expand(B, T), None
        else:
            positions, mask = build_attention_mask(attention_mask)
        cos, sin = precompute_rope(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        if torch.is_autocast_enabled(x.device.type):
            cos = cos.to(torch.get_autocast_dtype(x.device.type))
            sin = sin.to(torch.get_autocast_dtype(x.device.type))
        k = self.checkpoint_every
        for i, layer in enumerate(self.layers):
            past = (prefix.keys[i], prefix.values[i]) if prefix is not None else None
            # A pass that keeps its keys/values (a shared prefix, batch 1) is not checkpointed:
            # a recompute would append to `keep` again, and batch 1 stores little.
            recompute = k and torch.is_grad_enabled() and i % k == 0 and keep is None
            if recompute and self.checkpoint_offload:
                # cos, sin, mask and past by keyword: checkpoint saves only positional tensors,
                # so only x moves; the rest are shared by every block and stay where they are.
                with offload_to_host():
                    x = checkpoint(layer, x, cos=cos, sin=sin, mask=mask, past=past,
                                   use_reentrant=False)
            elif recompute:
                x = checkpoint(layer, x, cos, sin, mask, past, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, past, keep)
        return self.norm(x)

    def hidden_states_shared(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                             prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`hidden_states` for rows whose first `prefix_len` tokens are the same, with grad
        (training): the prefix runs once, batch 1, and every row's own tokens (right-padded)
        attend to its keys/values; in backward the rows' gradients on those keys/values add up
        (the expand's backward) and flow through the one prefix pass. LoRA dropout draws one
        mask for the prefix, shared by the rows (each row drawing its own would be the same
        in expectation). -> (h_prefix (1, P, dim), h_rows (B, T - P, dim))."""
        P = prefix_len
        if not 0 < P < input_ids.shape[1]:
            raise ValueError(f"prefix_len must be in [1, {input_ids.shape[1] - 1}], got {P}")
        kept: list = []
        h_prefix = self.hidden_states(input_ids[:1, :P], keep=kept)
        rows_mask = attention_mask[:, P:] if attention_mask is not None else None
        h_rows = self.hidden_states(input_ids[:, P:], rows_mask,
                                    prefix=PrefixKV([k for k, _ in kept], [v for _, v in kept]))
        return h_prefix, h_rows

    @torch.no_grad()
    def encode_prefix(self, input_ids: torch.Tensor) -> PrefixKV:
        """The keys/values of a (1, P) token prefix at every layer, for `hidden_states(...,
        prefix=)`: prompts that start alike (TALLRec's instruction, ~70 tokens of ~220) are
        then scored without running their common start through the model once per row."""
        if input_ids.shape[0] != 1:
            raise ValueError(f"a shared prefix is one row, got {input_ids.shape[0]}")
        kept: list = []
        self.hidden_states(input_ids, keep=kept)
        return PrefixKV([k for k, _ in kept], [v for _, v in kept])

    def forward(self, input_ids, attention_mask=None, logits_at: torch.Tensor | None = None,
                vocab_rows: list[int] | None = None, prefix: PrefixKV | None = None):
        """Logits (B, T, vocab), or (B, P, ·) at the positions `logits_at` (B, P) only, and
        (·, len(vocab_rows)) for those vocabulary entries only.

        Yes/No scoring needs one position per row and two entries of it; a full-vocabulary
        row per token is the largest activation of the model, so never compute what nobody
        reads.
        """
        h = self.hidden_states(input_ids, attention_mask, prefix)
        if logits_at is not None:
            h = torch.gather(h, 1, logits_at[..., None].expand(-1, -1, h.shape[-1]))
        if vocab_rows is not None:
            return linear(h, self.lm_head.weight[list(vocab_rows)])
        return self.lm_head(h)
