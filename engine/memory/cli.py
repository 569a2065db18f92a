"""`python -m engine.memory`: print the plan for a model, sequence length and budget."""

from __future__ import annotations

import argparse
import sys

from engine.memory.bytemodel import BACKENDS, PlanError
from engine.memory.plan import choose, plan
from kernels.dispatch import LORA_IMPLS
from model.lora import TARGETS, LoRAConfig
from model.quant import PLAN_FORMATS


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m engine.memory",
        description="Plan the GPU memory of LoRA training: weights, adapter and optimizer, "
                    "activations, loss, peak; pick a micro-batch and checkpointing policy.")
    ap.add_argument("--base", default="llama-7b",
                    help="model preset name (llama-7b, smollm2-135m, tiny, ...; random:<preset> "
                         "is accepted too)")
    ap.add_argument("--seq", type=int, default=512, help="sequence length in tokens")
    ap.add_argument("--budget", default="24GiB",
                    help="memory budget, e.g. 24GiB (an RTX 3090), 80GiB, 16000MiB")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank")
    ap.add_argument("--targets", default="q,v",
                    help="comma-separated LoRA targets among " + ",".join(TARGETS))
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (TALLRec: 0.05)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="sequences per forward/backward; default: chosen for the budget")
    ap.add_argument("--checkpoint", default=None,
                    help="gradient checkpointing: none, full, or every-k (every k-th block); "
                         "default: the cheapest that fits")
    ap.add_argument("--checkpoint-offload", action="store_true",
                    help="keep each checkpointed block's input in pinned host memory until "
                         "backward recomputes that block (train.py --checkpoint-offload): one "
                         "block input on the GPU instead of one per checkpointed block; the "
                         "host RAM it takes is printed on its own line")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"],
                    help="bf16/fp16: base weights in that dtype + autocast; fp32: no autocast")
    ap.add_argument("--loss-chunk", type=int, default=1024,
                    help="rows per LM-head chunk in the chunked cross-entropy")
    ap.add_argument("--backend", default="flash", choices=BACKENDS,
                    help="SDPA kernel: flash (CUDA; padded batches use efficient), efficient, "
                         "cpu-flash, cpu-flash-fp32 (bf16 on a CPU without bf16 instructions: "
                         "fp32 GEMMs and attention), math")
    ap.add_argument("--lora-impl", default="triton", choices=LORA_IMPLS,
                    help="LoRA layer: triton (fused kernel) or torch (cuBLAS + addmm_)")
    ap.add_argument("--unpadded", action="store_true",
                    help="batches carry no padding mask (default: padded, as collate_train)")
    ap.add_argument("--reserve", default="1GiB",
                    help="memory the CUDA context and allocator slack take outside PyTorch's "
                         "allocations")
    ap.add_argument("--max-micro-batch", type=int, default=32,
                    help="largest micro-batch to consider (TALLRec: 32)")
    ap.add_argument("--quant", default="none", choices=list(PLAN_FORMATS),
                    help="frozen base storage: int8, nf4, nf4-dq, or a GGUF block format "
                         "(q8_0, q4_0, q4_1); the decoder Linear weights only")
    ap.add_argument("--quant-impl", default="triton", choices=LORA_IMPLS,
                    help="quantized matmul: triton (the kernel, CUDA) or torch (dequantize per "
                         "call, CPU)")
    ap.add_argument("--min-tokens", type=int, default=4096,
                    help="tokens per micro-batch to reach before trading memory for less "
                         "recomputation")
    args = ap.parse_args(argv)
    try:
        lora = LoRAConfig(r=args.r, dropout=args.dropout, targets=args.targets.split(","))
        kw = dict(backend=args.backend, lora_impl=args.lora_impl, padded=not args.unpadded,
                  loss_chunk=args.loss_chunk, reserve=args.reserve, quant=args.quant,
                  quant_impl=args.quant_impl, offload=args.checkpoint_offload)
        if args.micro_batch is not None and args.checkpoint is not None:
            p = plan(args.base, args.seq, args.micro_batch, lora, args.precision,
                     args.checkpoint, budget=args.budget, **kw)
        else:
            p = choose(args.base, args.seq, args.budget, lora, args.precision,
                       micro_batch=args.micro_batch, checkpoint=args.checkpoint,
                       min_tokens=args.min_tokens, max_micro_batch=args.max_micro_batch, **kw)
    except (PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(p.table())
    return 0 if p.fits else 1
