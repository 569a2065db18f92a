"""Data parallelism under `torchrun`: PyTorch's own stack (torch.distributed, DDP), nothing
home-made.

`torchrun --nproc_per_node N train.py ...` starts N processes with RANK/WORLD_SIZE/LOCAL_RANK
set. Each rank holds the whole (tiny) training set and forms every optimizer step exactly as
one process would; it then computes only its share of the step's micro-batches, dealt round
robin, and DDP all-reduces the LoRA gradients once per step (`no_sync` on all but the last
micro-batch). The loss keeps its single-process weighting: a piece's mean loss is weighted by
its tokens over the *global* token count of the step, which every rank knows without talking,
so the sum over ranks is the one-process gradient. DDP averages over ranks, hence the factor
`world` on each piece. Rank 0 alone writes; scoring splits the rows across ranks and gathers.

A single process (no WORLD_SIZE, or 1) never creates a process group or touches any of this.
"""

from __future__ import annotations

import datetime
import gc
import os
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.collate import IGNORE_INDEX

# A rank that dies (kill -9) leaves the others blocked in a collective; torchrun's agent
# ends them at once, and this timeout ends them even without it (another node's agent).
DEFAULT_TIMEOUT_S = 600


def loss_tokens(examples) -> int:
    """Targets that carry loss: position t predicts labels[t + 1]; IGNORE_INDEX carries none."""
    return sum(1 for e in examples for y in e.labels[1:] if y != IGNORE_INDEX)


class _HiddenStates(nn.Module):
    """DDP prepares its gradient hooks in forward(); the chunked loss calls hidden_states()
    and the frozen LM head itself, so forward() is made to be hidden_states()."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, prefix_len: int = 0):
        # A shared prefix's two passes (prefix once, then the rows) are one forward here:
        # DDP expects one forward per backward.
        if prefix_len:
            return self.model.hidden_states_shared(input_ids, attention_mask, prefix_len)
        return self.model.hidden_states(input_ids, attention_mask)


class LossModel:
    """What causal_lm_loss reads (hidden_states, hidden_states_shared, lm_head), with the
    hidden states through DDP."""

    def __init__(self, ddp: DistributedDataParallel, model):
        self.hidden_states, self.lm_head = ddp, model.lm_head
        self.ddp = ddp

    def hidden_states_shared(self, input_ids, attention_mask, prefix_len: int):
        return self.ddp(input_ids, attention_mask, prefix_len=prefix_len)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    ddp: DistributedDataParallel | None = None
    loss_model: LossModel | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- set-up -------------------------------------------------------------------------

    def device(self, requested: str) -> str:
        """Each rank on its own GPU (LOCAL_RANK); CPU ranks share the CPU."""
        if not self.enabled or requested == "cpu":
            return requested
        if requested in ("auto", "cuda") and torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return "cuda"
        return requested

    def wrap(self, model) -> LossModel:
        """DDP over the trainable (LoRA) parameters; rank 0's values are broadcast."""
        device = next(model.parameters()).device
        self.ddp = DistributedDataParallel(
            _HiddenStates(model), device_ids=[device.index] if device.type == "cuda" else None)
        self.loss_model = LossModel(self.ddp, model)
        return self.loss_model

    # -- one optimizer step -------------------------------------------------------------

    def pieces(self, micro: list[list], step_mode: str) -> list[tuple[list, float]]:
        """This rank's share of one step -> [(samples, loss factor)].

        Whole micro-batches go round robin; when there are fewer than ranks, each is cut in
        `world` slices so that every rank works. The factor undoes DDP's mean over ranks
        (x world) and, with step_mode tallrec (a micro-batch's *mean* loss / accum), weights
        a slice by its share of its micro-batch's loss tokens. A rank left without samples
        (a step smaller than the world) runs one sample with factor 0: it must still join
        the all-reduce."""
        w, r = self.world, self.rank
        if len(micro) >= w:
            mine = [(mb, 1.0) for mb in micro[r::w]]
        else:
            mine = []
            for mb in micro:
                cut = np.array_split(np.arange(len(mb)), w)[r]
                part = [mb[i] for i in cut]
                if part:
                    share = 1.0 if step_mode == "mean" else \
                        loss_tokens(part) / max(loss_tokens(mb), 1)
                    mine.append((part, share))
        if not mine:
            return [(micro[0][:1], 0.0)]
        return [(mb, share * w) for mb, share in mine]

    def sync(self, i: int, n: int):
        """Gradients are all-reduced on the last piece only."""
        return self.ddp.no_sync() if i < n - 1 else nullcontext()

    def sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    # -- gathering ----------------------------------------------------------------------

    @property
    def comm_device(self):
        return torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")

    def gather(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def shard(self, rows: list) -> list:
        return rows[self.rank::self.world]

    def unshard(self, parts: list[np.ndarray]) -> np.ndarray:
        """Inverse of shard: rank r held rows r, r + world, ...; -> the rows in order."""
        n = sum(len(p) for p in parts)
        out = np.empty(n, dtype=parts[0].dtype)
        for r, p in enumerate(parts):
            out[r::self.world] = p
        return out

    def own_rng(self, saved: dict) -> dict:
        """This rank's RNG state from a checkpoint's (rank 0 stores every rank's)."""
        ranks = saved.get("ranks")
        n = len(ranks) if ranks else 1
        if n != self.world:
            raise ValueError(f"--resume: the checkpoint was written by {n} process(es), this run "
                             f"has {self.world}; resume with the same number (torchrun "
                             f"--nproc_per_node, or no torchrun for 1) for an exact resume")
        return ranks[self.rank] if ranks else saved

    def barrier(self):
        dist.barrier()

    def close(self):
        """Tear down together: every rank reaches the barrier, DDP's reducer (which holds the
        group) goes first, then the group. A rank that destroys the group while another still
        uses it, or while its own reducer lives, can abort in gloo's threads at exit."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            self.ddp = self.loss_model = None
            gc.collect()
            dist.destroy_process_group()


class NoLog:
    """The metrics log of ranks other than 0: rank 0 writes it."""

    def write(self, **record):
        pass


def from_env(device: str = "auto") -> Dist:
    """The process group torchrun asks for (nccl on CUDA, gloo on CPU), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(rank=int(os.environ.get("RANK", "0")), world=world,
             local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if not d.enabled:
        return d
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        timeout = float(os.environ.get("TALLREC_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        if use_cuda:
            torch.cuda.set_device(d.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
    return d


def rank_seed(seed: int, rank: int) -> int:
    """Dropout streams differ between ranks (rank 0 keeps the seed's own stream)."""
    return seed + 1_000_003 * rank
