"""Analytical memory planner for LoRA training of our LLaMA (model/llama.py).

    plan(base, seq_len, micro_batch, lora=None, precision="bf16", checkpoint="none", ...) -> Plan
    choose(base, seq_len, budget, lora=None, precision="bf16", micro_batch=None, ...) -> Plan
    python -m engine.memory --base llama-7b --seq 512 --budget 24GiB

bytemodel.py counts the bytes of each part below, plan.py adds them up into a `Plan` and
chooses a micro-batch and checkpointing policy for a budget, cli.py is the command line.

Peak = frozen base weights + LoRA params, grads, AdamW states (fp32)
     + activations saved for backward
     + max(recompute of one checkpointed block + backward temporaries, loss workspace)
     + runtime reserve (CUDA context, allocator slack: not in max_memory_allocated).

The activation terms are the tensors autograd actually keeps for OUR model, read off its code
and checked against `saved_tensors_hooks` on CPU (tests/test_memory.py):
- RMSNorm (model/ops.py) keeps its input in the residual's dtype and 1/rms (fp32); its
  backward rebuilds the fp32 input.
- A frozen linear keeps no input (no dW). A LoRA linear keeps its input for dA (torch path:
  drop(x), plus the dropout noise in the compute dtype; Triton path: x and a bool mask), and
  xa = drop(x) Aᵀ (r wide; fp32 in the Triton kernel).
- rope keeps cos/sin (shared by all layers). SDPA keeps q, k, v (after repeat_kv: n_heads
  wide; CPU flash reads grouped K/V, n_kv_heads wide), out and the fp32 logsumexp (flash /
  efficient / CPU flash); the math path keeps the scaled q, k, v and the (T × T) probabilities.
  A padding mask is kept per layer in the compute dtype by the CPU flash and CUDA efficient
  kernels (only left-padded batches carry one: right padding needs causal attention alone).
- SwiGLU (model/ops.py) keeps gate and up (silu(gate) is recomputed in backward); down's
  input only when down has LoRA.
- The first block's input (frozen embeddings) needs no grad: its first RMSNorm keeps nothing.
- A checkpointed block keeps only its input; its activations come back in backward.
  With offloading (`Llama.checkpoint_offload`) that input waits in host memory and comes
  back just before its block is recomputed: one block input on the device at a time.
- The loss (engine/loss.py) keeps ∂L/∂h for the selected rows and their int64 index.
"""

from engine.memory.bytemodel import (
    BACKENDS,
    GiB,
    PlanError,
    backward_temporaries,
    block_saved,
    checkpoint_name,
    fmt_bytes,
    lora_param_count,
    loss_workspace,
    parse_bytes,
    parse_checkpoint,
    resolve_config,
)
from engine.memory.cli import main
from engine.memory.plan import Plan, choose, plan

__all__ = ["BACKENDS", "GiB", "Plan", "PlanError", "backward_temporaries", "block_saved",
           "checkpoint_name", "choose", "fmt_bytes", "lora_param_count", "loss_workspace", "main",
           "parse_bytes", "parse_checkpoint", "plan", "resolve_config"]
