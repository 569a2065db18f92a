"""Everything `train` checks before the slow part: the output folder, the device, the base
model's header and tokenizer, an initial adapter, the data and the memory plan. Nothing here
writes to disk, so a failed start leaves the output folder as it was and the corrected
command runs as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from data.collate import TokenizeConfig, encode_all
from data.fewshot import k_shot, k_shot_split, load_alpaca, load_domain, mix_domains
from data.records import load_records
from engine.config import TrainConfig, resume_diff
from engine.memory import PlanError, choose, fmt_bytes, parse_bytes, plan
from engine.precision import explain_precision
from engine.state import check_out_dir, load_trainer_state, read_run_config
from fileio import find_dir
from kernels import cpu_bf16
from kernels.dispatch import lora_path
from model import probe_base
from model.adapter import read_adapter_config
from model.checkpoint import resolve_base
from model.formats.gguf import gguf_linear_format


class TrainingError(RuntimeError):
    pass




# -- data ---------------------------------------------------------------------------------

def load_data(cfg: TrainConfig):
    """-> (train records, validation records, description, synthetic?)."""
    root = cfg.data_root
    if cfg.stage == "it":
        pool = load_alpaca(cfg.data or "alpaca_small", root)
        rows = k_shot(pool.records, -1, cfg.seed)  # shuffled with the seed; the head validates
        n_val = min(cfg.val_size if cfg.val_size > 0 else 0, len(rows) // 5)
        return rows[n_val:], rows[:n_val], pool.describe(), False
    domains = ["movie", "book"] if cfg.domain == "both" else [cfg.domain]
    if cfg.data:
        train = load_records(cfg.data, rec=True)
        train = k_shot(train, cfg.shots, cfg.seed)
        desc, synthetic = f"{cfg.data} ({cfg.shots}-shot)", False
    else:
        pools = [load_domain(d, "train", root) for d in domains]
        split = mix_domains(pools, cfg.shots, cfg.seed) if len(pools) > 1 else \
            k_shot_split(pools[0], cfg.shots, cfg.seed)
        train, desc, synthetic = split.records, split.describe(), split.synthetic
    if cfg.val_data:
        val = load_records(cfg.val_data, rec=True)
    else:
        val = [r for d in domains for r in load_domain(d, "valid", root).records]
    if cfg.val_size > 0 and cfg.val_size < len(val):
        val = k_shot(val, cfg.val_size, cfg.seed)
    return train, val, desc, synthetic


# -- resume -------------------------------------------------------------------------------

def check_resume_config(out: Path, cfg: TrainConfig):
    diff = resume_diff(read_run_config(out), cfg.to_dict())
    if diff:
        raise ValueError(f"--resume: settings differ from the run in {out}: " + ", ".join(diff))


def load_checkpoint(out: Path):
    """-> (the last good checkpoint folder, its trainer state), or (None, None) when the run
    stopped before its first save."""
    last = find_dir(out / "last")
    if last is None:
        return None, None
    read_adapter_config(last)  # fails now, naming the file, rather than after model loading
    return last, load_trainer_state(last / "trainer_state.pt")


# -- before anything is loaded or written ----------------------------------------------------

@dataclass
class Prepared:
    """What `preflight` checked and read: the model is loaded only once all of it is fine."""
    device: torch.device
    policy: object  # engine.precision.Precision
    tok: object  # model.tokenizer.Tokenizer
    train_rows: list
    val_rows: list
    desc: str
    synthetic: bool
    examples: list
    val_examples: list
    cut_summary: str
    checkpoint: tuple  # (last folder or None, trainer state or None), for --resume


def preflight(cfg: TrainConfig, world: int = 1) -> Prepared:
    """Every check that can be made before the (slow) model load, in the order a user can fix
    them: output folder, device, base header, tokenizer, adapter, data, memory. Writes
    nothing, so a failed start leaves the output folder as it was. world: torchrun's ranks
    (the memory plan is per rank)."""
    out = Path(cfg.out)
    check_out_dir(out, cfg.resume, cfg.overwrite)
    checkpoint = (None, None)
    if cfg.resume:
        check_resume_config(out, cfg)
        checkpoint = load_checkpoint(out)
    device, policy, why = explain_precision(cfg.device, cfg.precision)
    print(f"precision: {why}")
    base_cfg, tok = probe_base(cfg.base, cfg.tokenizer, cfg.data_root, cfg.quant)
    if tok is None:
        raise TrainingError(f"base {cfg.base!r} comes without a tokenizer; pass --tokenizer")
    if cfg.stage == "rt":
        tok.answer_token_ids()  # validation scores Yes/No: fail now, not at the first validation
    if cfg.init_adapter:
        lora, _ = read_adapter_config(cfg.init_adapter)
        want = cfg.lora()
        diffs = [f"{what} {a} (adapter) vs {b} (this run)" for what, a, b in (
            ("--lora-r", lora.r, want.r), ("--lora-alpha", lora.alpha, want.alpha),
            ("--lora-targets", lora.targets, want.targets)) if a != b]
        if diffs:
            raise TrainingError(f"--init-adapter {cfg.init_adapter} does not match this run's "
                                f"LoRA: {'; '.join(diffs)}")
    train_rows, val_rows, desc, synthetic = load_data(cfg)
    if not train_rows:
        raise TrainingError(f"no training rows ({desc})")
    tcfg = TokenizeConfig(cutoff_len=cfg.cutoff_len, train_on_inputs=cfg.train_on_inputs)
    examples, cut = encode_all(train_rows, tok, tcfg)
    val_examples = encode_all(val_rows, tok, tcfg)[0] if cfg.stage == "it" else []
    plan_memory(cfg, base_cfg, device, policy, max(len(e.input_ids) for e in examples), world)
    return Prepared(device, policy, tok, train_rows, val_rows, desc, synthetic, examples,
                    val_examples, cut.summary(rec=cfg.stage == "rt"), checkpoint)


def plan_memory(cfg: TrainConfig, model_cfg, device, policy, seq_len: int, world: int = 1):
    """Print the memory plan of one micro-batch at the longest sample; refuse to start when
    it exceeds the budget (--memory-budget, else the GPU's memory), naming a plan that fits.
    Under torchrun (world > 1) it is each rank's plan, DDP's gradient buckets included."""
    budget = cfg.memory_budget
    if budget is None and device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory
    lora = cfg.lora()
    # The path the LoRA layers will take for this micro-batch: the layers ask the same function.
    lora_impl = lora_path(lora.kernel, device.type, policy.compute_dtype or policy.weight_dtype,
                          cfg.micro_batch_size * seq_len, lora.r)
    backend = "efficient" if device.type == "cuda" else "cpu-flash"
    if policy.compute_dtype == torch.bfloat16 and cpu_bf16.emulated(device):
        backend = "cpu-flash-fp32"  # fp32 GEMMs and attention (kernels/cpu_bf16.py)
    quant = cfg.quant
    if quant == "gguf":  # the planner counts the blocks the file holds
        quant = gguf_linear_format(resolve_base(cfg.base, cfg.data_root))
    quant_impl = "triton" if device.type == "cuda" and cfg.use_kernels else "torch"
    kw = dict(lora=lora, precision=policy, backend=backend, lora_impl=lora_impl,
              quant=quant, quant_impl=quant_impl, ddp_world=world,
              offload=cfg.checkpoint_offload)
    p = plan(model_cfg, seq_len, cfg.micro_batch_size, checkpoint=cfg.checkpointing,
             budget=budget, **kw)
    print(p.table() if budget is not None or world > 1 else f"memory plan: {p.summary()}")
    if not p.fits:
        try:
            alt = choose(model_cfg, seq_len, budget, **kw)
            offload = (" --checkpoint-offload" if alt.offload else
                       " --no-checkpoint-offload" if cfg.checkpoint_offload else "")
            hint = (f"nearest plan that fits: --micro-batch-size {alt.micro_batch} "
                    f"--checkpointing {alt.checkpoint}{offload} ({fmt_bytes(alt.peak)})")
        except PlanError as e:
            hint = str(e)
        raise PlanError(f"the plan needs {fmt_bytes(p.peak)} but the budget is "
                        f"{fmt_bytes(parse_bytes(budget))}; {hint}")
