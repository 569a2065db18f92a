"""The training loop: `train(cfg)` reads top-down, nanoGPT style.

One optimizer step = the loss over `batch_size` samples, accumulated over micro-batches of
`micro_batch_size`. With `step_mode="mean"` a step averages over its tokens (a step never
holds more samples than the training set has); with `step_mode="tallrec"` each micro-batch's
mean loss is divided by batch_size/micro_batch_size, as TALLRec's HF Trainer does even when
K < batch_size leaves fewer micro-batches.

Everything random is seeded: K-shot sampling and data order (numpy generators from the seed
and the epoch), LoRA init and dropout (torch's generator, saved in every checkpoint), so a
resumed run ends with the same adapter as an uninterrupted one.

SIGINT (Ctrl-C) or SIGTERM stops a run cleanly: the step in flight finishes, a checkpoint is
written, and `Stopped` says how to resume; a second signal stops at once, losing what the last
checkpoint does not hold. (Under torchrun the signals keep their default action: the ranks
would have to agree on the step.)
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.collate import IGNORE_INDEX, collate_train, pad_value
from engine.config import TrainConfig
from engine.distributed import Dist, NoLog, from_env, rank_seed
from engine.loss import causal_lm_loss
from engine.memory import fmt_bytes
from engine.preflight import Prepared, TrainingError, load_data, preflight  # noqa: F401
from engine.scoring import metrics, score_split
from engine.state import (
    MetricsLog,
    TrainState,
    prepare_out_dir,
    rng_state,
    save_trainer_state,
    set_rng_state,
)
from fileio import (
    WriteError,
    atomic_write,
    atomic_write_dir,
    atomic_write_json,
    fault_point,
    find_dir,
)
from model import load_base
from model.adapter import load_adapter, read_adapter_config, save_adapter
from model.lora import mark_only_lora_trainable
from model.quant import weight_bytes

# -- data ---------------------------------------------------------------------------------

def step_batches(n: int, cfg: TrainConfig, epoch: int, lengths: list[int]) -> list[list[int]]:
    """This epoch's optimizer steps, each a list of sample indices."""
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n).tolist()
    per_step = min(cfg.batch_size, n)
    steps = [order[i:i + per_step] for i in range(0, n, per_step)]
    if cfg.group_by_length:
        steps = [sorted(s, key=lambda i: -lengths[i]) for s in steps]
    return steps


def get_lr(step: int, total: int, cfg: TrainConfig) -> float:
    warmup = cfg.resolved_warmup_steps(total)
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (1 - progress)


# -- validation ---------------------------------------------------------------------------

def validate(model, tok, cfg: TrainConfig, val_records, val_examples, policy,
             dist: Dist | None = None, progress: bool = False) -> dict:
    """rt: AUC of P(Yes) on the validation rows; it: mean token loss. Under torchrun each
    rank takes its share of the rows and every rank gets the same result."""
    if cfg.stage == "rt":
        probs, labels, _, _ = score_split(model, tok, val_records, cfg.eval_batch_size,
                                          cfg.cutoff_len, policy, dist=dist,
                                          progress=progress, desc="validation",
                                          share_prefix=cfg.share_prefix)
        m = metrics(probs, labels)
        m["metric"] = m["auc"] if m["auc"] is not None else float("nan")
        return m
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    if dist is not None and dist.enabled:
        val_examples = dist.shard(val_examples)
    with torch.no_grad(), policy.autocast(device):
        for i in range(0, len(val_examples), cfg.eval_batch_size):
            b = collate_train(val_examples[i:i + cfg.eval_batch_size], pad_value(tok))
            loss, n = causal_lm_loss(model, b["input_ids"].to(device),
                                     b["attention_mask"].to(device), b["labels"].to(device),
                                     share_prefix=cfg.share_prefix)
            total, count = total + float(loss) * n, count + n
    model.train()
    if dist is not None and dist.enabled:
        total, count = dist.sum(total, count)
    val_loss = total / max(count, 1)
    return {"val_loss": val_loss, "metric": -val_loss}


# -- stopping on a signal -----------------------------------------------------------------

class Stopped(KeyboardInterrupt):
    """The run stopped on SIGINT/SIGTERM after saving its last step; --resume continues it.
    A KeyboardInterrupt, so that callers that record failures (the grid) let it through;
    `exit_code` is the shell's for that signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, sig: signal.Signals):
        super().__init__(message)
        self.exit_code = 128 + int(sig)


@contextmanager
def stop_on_signal(enabled: bool = True):
    """-> a dict whose "signal" becomes the signal (signal.Signals) when SIGINT or SIGTERM
    arrives; the loop reads it after each step. A second signal raises KeyboardInterrupt at once."""
    asked: dict = {"signal": None}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield asked
        return
    # a signal set to be ignored (a grid worker's SIGINT) stays ignored
    signals = [s for s in (signal.SIGINT, signal.SIGTERM)
               if signal.getsignal(s) is not signal.SIG_IGN]
    before = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):
        if asked["signal"] is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped at once")
        asked["signal"] = signal.Signals(signum)
        tqdm.write(f"{asked['signal'].name}: stopping after this step, with a checkpoint "
                   f"(send it again to stop at once)")

    for s in signals:
        signal.signal(s, handler)
    try:
        yield asked
    finally:
        for s, h in before.items():
            signal.signal(s, h)


# -- checkpoints --------------------------------------------------------------------------

def save_last(out: Path, model, opt, scaler, state: TrainState, cfg: TrainConfig,
              dist: Dist | None = None):
    rng = rng_state()
    if dist is not None and dist.enabled:  # every rank's stream, so that --resume is exact
        rng = {**rng, "ranks": dist.gather(rng)}
        if not dist.is_main:
            return

    def write(folder):
        save_adapter(model, folder, base_name=cfg.base)
        save_trainer_state(folder / "trainer_state.pt",
                           {"state": state.__dict__, "optimizer": opt.state_dict(),
                            "scaler": scaler.state_dict(), "rng": rng})
    atomic_write_dir(out / "last", write)


def save_best(out: Path, model, state: TrainState, cfg: TrainConfig, m: dict):
    def write(folder):
        save_adapter(model, folder, base_name=cfg.base)
        atomic_write(folder / "best.json", json.dumps({"step": state.step, **m}, indent=2))
    atomic_write_dir(out / "best", write)


# -- the loop -----------------------------------------------------------------------------

def train(cfg: TrainConfig, progress: bool = True) -> dict:
    out = Path(cfg.out)
    dist = from_env(cfg.device)  # under torchrun: a process group; else one process
    dist.device(cfg.device)  # under torchrun on CUDA: this rank's GPU becomes the current one
    prep = preflight(cfg, dist.world)
    try:
        # Only now is anything written: the folder, then the settings (rank 0 alone, after
        # every rank has checked the folder as it was).
        if dist.enabled:
            dist.barrier()
        if dist.is_main:
            prepare_out_dir(out, cfg.resume, cfg.overwrite)
            if not cfg.resume:
                atomic_write_json(out / "config.json", cfg.to_dict())
        if dist.enabled:
            dist.barrier()
        return run(cfg, prep, progress and dist.is_main, dist)
    except WriteError as e:
        saved = find_dir(out / "last")
        kept = (f"kept the last good checkpoint {saved}" if saved is not None
                else "no checkpoint had been saved yet")
        how = (f"python train.py --out {out} --resume" if (out / "config.json").is_file()
               else "the same command")
        raise TrainingError(f"{e}; {kept}; fix that, then run {how}") from None


def run(cfg: TrainConfig, prep: Prepared, progress: bool, dist: Dist | None = None) -> dict:
    """Load the model and train, in a folder `train` has prepared."""
    out = Path(cfg.out)
    device, policy, tok = prep.device, prep.policy, prep.tok
    scaler = policy.make_scaler(device)
    torch.manual_seed(cfg.seed)

    # Model: the base with LoRA built in, optionally started from a stage-1 adapter.
    model, tok = load_base(cfg.base, dtype=policy.weight_dtype, device=device, lora=cfg.lora(),
                           tokenizer=tok, seed=cfg.seed, data_root=cfg.data_root,
                           quant=cfg.quant, quant_kernel=cfg.quant_kernel())
    if cfg.quant != "none":
        sizes = weight_bytes(model)
        print(f"frozen base: decoder Linear weights {cfg.quant} ({fmt_bytes(sizes['quantized'])})"
              f", the rest dense ({fmt_bytes(sizes['dense'])})")
    if cfg.init_adapter:
        _, init_base = read_adapter_config(cfg.init_adapter)
        load_adapter(model, cfg.init_adapter)  # checks rank, targets and every shape
        print(f"initialised LoRA from {cfg.init_adapter} (trained on base {init_base})")
    model.checkpoint_every = cfg.checkpoint_every()
    model.checkpoint_offload = cfg.checkpoint_offload
    dist = dist or Dist()
    if dist.rank > 0:  # same LoRA init on every rank, but each its own dropout stream
        torch.manual_seed(rank_seed(cfg.seed, dist.rank))
    n_trainable = mark_only_lora_trainable(model)
    print(f"trainable LoRA parameters: {n_trainable:,} "
          f"({100 * n_trainable / model.cfg.n_params:.3f}% of {model.cfg.n_params:,})")

    # Data: tokenized once in preflight; history items dropped to fit the cutoff are counted.
    examples, val_examples, val_rows = prep.examples, prep.val_examples, prep.val_rows
    lengths = [len(e.input_ids) for e in examples]
    print(f"train: {prep.desc}; {prep.cut_summary}; tokens/sample median "
          f"{int(np.median(lengths))}, max {max(lengths)}")
    print(f"validation: {len(val_rows)} rows" + (" [SYNTHETIC]" if prep.synthetic else ""))
    steps_per_epoch = len(step_batches(len(examples), cfg, 0, lengths))
    total_steps = steps_per_epoch * cfg.epochs
    # --max-steps stops early without reshaping the schedule, which spans every epoch.
    total_steps_run = min(total_steps, cfg.max_steps) if cfg.max_steps > 0 else total_steps
    eval_every = cfg.resolved_eval_every(steps_per_epoch)
    save_every = cfg.save_every or eval_every

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = TrainState()
    last, ckpt = prep.checkpoint
    if last is not None:
        load_adapter(model, last)
        opt.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        state = ckpt["state"]
        set_rng_state(dist.own_rng(ckpt["rng"]))
        print(f"resumed from {last} at step {state.step}")
    elif cfg.resume:
        print(f"--resume: {out} has no checkpoint yet; starting it from step 0")
    log = MetricsLog(out / "metrics.jsonl", resume_step=state.step if cfg.resume else None) \
        if dist.is_main else NoLog()
    if dist.enabled:
        dist.wrap(model)  # after any adapter loading: DDP broadcasts rank 0's values
    model.train()
    bar = tqdm(total=total_steps_run, initial=state.step, desc=f"{cfg.stage} training",
               unit="step", disable=not progress)
    # Training throughput: tokens over the time spent in training steps only (validation and
    # checkpoint saving excluded), what the grid's ETA divides training tokens by.
    step_seconds, tokens0 = 0.0, state.train_tokens
    done = state.stopped_early or state.step >= total_steps_run
    with stop_on_signal(enabled=not dist.enabled) as asked:
        while not done:
            batches = step_batches(len(examples), cfg, state.epoch, lengths)
            for idx in batches[state.step_in_epoch:]:
                lr = get_lr(state.step, total_steps, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                t_step = time.perf_counter()
                loss, n_tok = train_step(model, opt, scaler, [examples[i] for i in idx], tok, cfg,
                                         device, policy, state.step, dist)
                step_seconds += time.perf_counter() - t_step
                state.step += 1
                state.step_in_epoch += 1
                state.train_tokens += n_tok
                tok_s = (state.train_tokens - tokens0) / max(step_seconds, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
                if state.step % cfg.log_every == 0:
                    log.write(step=state.step, epoch=state.epoch, loss=loss, lr=lr,
                              tokens=state.train_tokens, tokens_per_s=tok_s)
                if state.step % eval_every == 0 or state.step == total_steps_run:
                    done = evaluate_and_keep_best(model, tok, cfg, val_rows, val_examples, policy,
                                                  state, out, log, dist, progress)
                saved = state.step % save_every == 0 or done or state.step == total_steps_run
                if saved:
                    save_last(out, model, opt, scaler, state, cfg, dist)
                fault_point(f"step-{state.step}")
                if done or state.step >= total_steps_run:
                    done = True
                    break
                if asked["signal"]:
                    if not saved:
                        save_last(out, model, opt, scaler, state, cfg, dist)
                    bar.close()
                    raise Stopped(f"stopped by {asked['signal'].name} at step {state.step} of "
                                  f"{total_steps_run}, checkpoint saved in {out / 'last'}; "
                                  f"python train.py --out {out} --resume continues it",
                                  asked["signal"])
            else:
                state.epoch += 1
                state.step_in_epoch = 0
    bar.close()
    result = {"steps": state.step, "epochs_started": state.epoch + 1,
              "best_step": state.best_step, "best_val_metric": state.best_metric,
              "stopped_early": state.stopped_early, "train_tokens": state.train_tokens,
              "trainable_params": n_trainable, "synthetic_data": prep.synthetic,
              "adapter": str(out / ("best" if state.best_step is not None else "last"))}
    if dist.is_main:
        atomic_write_json(out / "result.json", result)
    dist.close()
    return result


def shares_prefix_in_training(cfg: TrainConfig) -> bool:
    """The training step shares the rows' prefix only without LoRA dropout, where it is the
    same computation. With dropout the rows would share one mask on the prefix: on the toy
    domain (the earlier README command, 48 steps of 16 rows; one seed each, bf16) that run
    reached test AUC 0.55 against 0.77 with each row drawing its own, while at dropout 0 the
    two learned alike (validation AUC 0.74 and 0.68 after 16 steps). Scoring has no dropout
    and always shares."""
    return cfg.share_prefix and cfg.lora_dropout == 0


def train_step(model, opt, scaler, batch, tok, cfg: TrainConfig, device, policy, step,
               dist: Dist | None = None):
    """One optimizer step over `batch` (accumulated micro-batches) -> (mean loss, tokens)."""
    micro = [batch[i:i + cfg.micro_batch_size] for i in range(0, len(batch), cfg.micro_batch_size)]
    n_loss_tokens = sum(sum(1 for y in e.labels[1:] if y != IGNORE_INDEX) for e in batch)
    accum = max(1, cfg.batch_size // cfg.micro_batch_size)
    total_loss, n_tokens = 0.0, 0
    # Under torchrun: this rank's pieces of the step, each with a loss factor (distributed.py)
    ddp = dist is not None and dist.enabled
    pieces = dist.pieces(micro, cfg.step_mode) if ddp else [(mb, None) for mb in micro]
    loss_model = dist.loss_model if ddp else model
    for i, (mb, factor) in enumerate(pieces):
        b = collate_train(mb, pad_value(tok))
        ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
        with dist.sync(i, len(pieces)) if ddp else nullcontext():
            with policy.autocast(device):
                loss, n = causal_lm_loss(loss_model, ids, mask, b["labels"].to(device),
                                         share_prefix=shares_prefix_in_training(cfg))
            if not torch.isfinite(loss) and not scaler.is_enabled():
                raise TrainingError(f"non-finite loss ({float(loss.detach())}) at step "
                                    f"{step + 1}; the adapter was not updated and no "
                                    f"checkpoint was written")
            # mean: token-weighted over the whole step; tallrec: HF Trainer's loss / accum steps
            weight = n / max(n_loss_tokens, 1) if cfg.step_mode == "mean" else 1.0 / accum
            scaled = loss * weight if factor is None else loss * weight * factor
            scaler.scale(scaled).backward()  # a no-op scale unless fp16
        if factor != 0.0:  # 0: a rank's stand-in piece, there only to join the all-reduce
            total_loss += float(loss.detach()) * n
            n_tokens += int(mask.sum())
    if ddp:
        total_loss, n_tokens = dist.sum(total_loss, n_tokens)
        n_tokens = int(n_tokens)
    scaler.unscale_(opt)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                       cfg.grad_clip)
    scaler.step(opt)  # fp16: skips the update when the unscaled gradients hold inf/NaN
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return total_loss / max(n_loss_tokens, 1), n_tokens


def evaluate_and_keep_best(model, tok, cfg, val_rows, val_examples, policy, state, out,
                           log, dist: Dist | None = None, progress: bool = False) -> bool:
    """Validate, keep the best adapter, and say whether early stopping ends the run."""
    if not val_rows:
        return False
    m = validate(model, tok, cfg, val_rows, val_examples, policy, dist, progress)
    improved = not math.isnan(m["metric"]) and (state.best_metric is None
                                                or m["metric"] > state.best_metric)
    if improved:
        state.best_metric, state.best_step, state.bad_evals = m["metric"], state.step, 0
        if dist is None or dist.is_main:
            save_best(out, model, state, cfg, m)
    else:
        state.bad_evals += 1
    log.write(step=state.step, **{f"val_{k}" if not k.startswith("val") else k: v
                                  for k, v in m.items() if k != "metric"},
              best_step=state.best_step)
    tqdm.write(f"step {state.step}: validation {fmt_val(m)} (best step {state.best_step})")
    if cfg.patience and state.bad_evals >= cfg.patience:
        state.stopped_early = True
        tqdm.write(f"early stop: {cfg.patience} validations without improvement")
    return state.stopped_early


def fmt_val(m: dict) -> str:
    if "val_loss" in m:
        return f"loss {m['val_loss']:.4f}"
    return "AUC undefined" if m["auc"] is None else f"AUC {m['auc']:.4f}"


