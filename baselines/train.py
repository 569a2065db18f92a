"""Training the baselines on K shots, and TALLRec's protocol around it: weight decay chosen
from {1e-3 ... 1e-7} on validation AUC, five seeds, mean and std of the test AUC.

Everything random comes from the seed: the K-shot sample (TALLRec's shuffle(seed), as the
LLM runs use), the model init and dropout (torch.manual_seed), the batch order (numpy
generator from [seed, epoch]).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from baselines.models import MODELS, ModelConfig, SeqRecommender, mse_loss
from data.fewshot import k_shot, load_domain
from data.items import ItemVocab, domain_vocab, record_to_ids, vocab_from_records
from engine.embed import DEFAULT_TEXT_BASE, title_embeddings
from engine.scoring import metrics

WEIGHT_DECAYS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)


@dataclass
class BaselineConfig:
    item_dim: int = 32
    feedback_dim: int = 8
    hidden: int = 32
    dropout: float = 0.1
    max_len: int = 10  # TALLRec pads histories to 10 with the last item
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 200  # upper bound; early stopping usually ends far sooner
    patience: int = 20  # epochs without a better validation AUC before stopping; 0 = never
    sasrec_blocks: int = 2
    text_base: str = DEFAULT_TEXT_BASE  # gru-text only
    text_tokenizer: str | None = None
    cache_dir: str | None = None  # text embedding cache (default: the tallrec cache)
    threads: int = 1  # torch CPU threads: the models are tiny, more threads only contend

    def __post_init__(self):
        for name in ("batch_size", "epochs", "max_len", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.lr <= 0 or self.patience < 0:
            raise ValueError("lr must be > 0 and patience >= 0")


@dataclass
class RunResult:
    model: str
    seed: int
    weight_decay: float
    valid_auc: float  # at the best epoch
    test_auc: float  # of the best-validation weights
    best_epoch: int
    epochs_run: int
    train_loss: list[float] = field(default_factory=list)  # mean MSE per epoch


def pad_history(history: list[int], feedback: list[int], length: int):
    """Keep the last `length` items; pad a shorter history with its last item (TALLRec)."""
    if not history:
        return [0] * length, [0] * length  # never in TALLRec's data: padding id, "disliked"
    history, feedback = history[-length:], feedback[-length:]
    n = length - len(history)
    return history + [history[-1]] * n, feedback + [feedback[-1]] * n


def encode(records: list[dict], vocab: ItemVocab, max_len: int) -> dict[str, torch.Tensor]:
    cols: dict[str, list] = {"history": [], "feedback": [], "target": [], "label": []}
    for r in records:
        s = record_to_ids(r, vocab)
        h, f = pad_history(s.history, s.feedback, max_len)
        for k, v in (("history", h), ("feedback", f), ("target", s.target), ("label", s.label)):
            cols[k].append(v)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in cols.items()}


def auc(labels, scores) -> float:
    """The engine's AUC (`engine.scoring.metrics`), raising where it would report undefined."""
    m = metrics(scores, labels)
    if m["auc"] is None:
        raise ValueError(f"AUC undefined: {m['auc_undefined']}")
    return m["auc"]


@torch.no_grad()
def predict(model: SeqRecommender, data: dict[str, torch.Tensor]) -> np.ndarray:
    model.eval()
    p = torch.sigmoid(model(data["history"], data["feedback"], data["target"]))
    model.train()
    return p.numpy()


def like_rate_auc(records: list[dict]) -> float:
    """AUC of the share of liked items in the history: a no-training reference point that
    reads only the feedback the baselines are given."""
    samples = [record_to_ids(r, ItemVocab("records")) for r in records]
    return auc([s.label for s in samples],
               [sum(s.feedback) / max(len(s.feedback), 1) for s in samples])


def text_table(vocab: ItemVocab, cfg: BaselineConfig) -> torch.Tensor:
    return title_embeddings(vocab.titles(), cfg.text_base, cfg.text_tokenizer, cfg.cache_dir)


def train_baseline(model_name: str, *args, cfg: BaselineConfig | None = None,
                   **kwargs) -> RunResult:
    """`_train_baseline` on `cfg.threads` torch threads, restoring the caller's setting after:
    the thread count changes float reductions, so leaking it would break bit-exact runs of
    other code in the same process."""
    threads = torch.get_num_threads()
    torch.set_num_threads((cfg or BaselineConfig()).threads)
    try:
        return _train_baseline(model_name, *args, cfg=cfg, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _train_baseline(model_name: str, train_records: list[dict], valid_records: list[dict],
                    test_records: list[dict], seed: int, weight_decay: float,
                    epochs: int | None = None, cfg: BaselineConfig | None = None,
                    vocab: ItemVocab | None = None,
                    text: torch.Tensor | None = None) -> RunResult:
    """Train on `train_records`, early-stop on validation AUC, score the test set with the
    best-validation weights. `vocab` defaults to ids assigned over the three record lists;
    `text` (gru-text) defaults to `cfg.text_base` embeddings of the vocabulary's titles."""
    if model_name not in MODELS:
        raise ValueError(f"unknown baseline {model_name!r}; known: {MODELS}")
    cfg = cfg or BaselineConfig()
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    if vocab is None:
        vocab = vocab_from_records("records", [*train_records, *valid_records, *test_records])
    # Encode every split before sizing the tables: cold items get their ids while encoding.
    train, valid, test = (encode(r, vocab, cfg.max_len)
                          for r in (train_records, valid_records, test_records))
    if model_name == "gru-text" and text is None:
        text = text_table(vocab, cfg)
    if text is not None and model_name == "gru-text" and len(text) < len(vocab):
        raise ValueError(f"text table has {len(text)} rows for {len(vocab)} item ids")

    torch.manual_seed(seed)
    mcfg = ModelConfig(n_items=len(vocab), item_dim=cfg.item_dim,
                       feedback_dim=cfg.feedback_dim, hidden=cfg.hidden, max_len=cfg.max_len,
                       dropout=cfg.dropout, sasrec_blocks=cfg.sasrec_blocks,
                       text_dim=text.shape[1] if model_name == "gru-text" else 0)
    table = text[: len(vocab)] if model_name == "gru-text" else None
    model = SeqRecommender(model_name, mcfg, table)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=weight_decay)

    n = len(train["label"])
    best = (-1.0, 0, copy.deepcopy(model.state_dict()))  # (valid AUC, epoch, weights)
    losses: list[float] = []
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        total = 0.0
        for s in range(0, n, cfg.batch_size):
            idx = torch.from_numpy(order[s:s + cfg.batch_size])
            loss = mse_loss(model(train["history"][idx], train["feedback"][idx],
                                  train["target"][idx]), train["label"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
        v = auc(valid["label"], predict(model, valid))
        if v > best[0]:
            best = (v, epoch, copy.deepcopy(model.state_dict()))
        elif cfg.patience and epoch - best[1] >= cfg.patience:
            break
    model.load_state_dict(best[2])
    test_auc = auc(test["label"], predict(model, test))
    return RunResult(model_name, seed, weight_decay, best[0], test_auc, best[1], epoch, losses)


# -- TALLRec's protocol -------------------------------------------------------------------

def select_weight_decay(valid_aucs: dict[float, list[float]]) -> float:
    """The weight decay with the best mean validation AUC over seeds (ties: the first)."""
    if not valid_aucs:
        raise ValueError("no weight decays to choose from")
    return max(valid_aucs, key=lambda wd: float(np.mean(valid_aucs[wd])))


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single seed)."""
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def run_baseline_grid(model_name: str, domain: str, shots: int, seeds: int | list[int] = 5,
                      weight_decays=WEIGHT_DECAYS, cfg: BaselineConfig | None = None,
                      data_root: Path | str | None = None,
                      train_fn: Callable[..., RunResult] = train_baseline,
                      log: Callable[[str], None] | None = None) -> dict:
    """Every (weight decay, seed) run on `shots` samples drawn with the seed; one weight
    decay per (model, domain, shots), picked on mean validation AUC; test mean +- std there."""
    cfg = cfg or BaselineConfig()
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    pool = load_domain(domain, "train", data_root).records
    valid = load_domain(domain, "valid", data_root).records
    test = load_domain(domain, "test", data_root).records
    vocab = domain_vocab(domain, data_root)
    # Give every cold item its id now, so the ids and table sizes of a run do not depend on
    # which K-shot samples earlier runs happened to draw.
    for r in (*pool, *valid, *test):
        record_to_ids(r, vocab)
    text = text_table(vocab, cfg) if model_name == "gru-text" else None

    runs: dict[float, list[RunResult]] = {}
    for wd in weight_decays:
        for seed in seed_list:
            train = k_shot(pool, shots, seed)  # the LLM's K shots for this seed
            r = train_fn(model_name, train, valid, test, seed=seed, weight_decay=wd, cfg=cfg,
                         vocab=vocab, text=text)
            runs.setdefault(wd, []).append(r)
            if log:
                log(f"{model_name} {domain} K={shots} wd={wd:g} seed={seed}: valid "
                    f"{r.valid_auc:.4f} test {r.test_auc:.4f} (best epoch {r.best_epoch})")
    chosen = select_weight_decay({wd: [r.valid_auc for r in rs] for wd, rs in runs.items()})
    test_mean, test_std = mean_std([r.test_auc for r in runs[chosen]])
    return {
        "model": model_name, "domain": domain, "shots": shots, "seeds": seed_list,
        "weight_decay": chosen, "test_auc_mean": test_mean, "test_auc_std": test_std,
        "valid_auc_mean": mean_std([r.valid_auc for r in runs[chosen]])[0],
        "per_seed": [{k: v for k, v in asdict(r).items() if k != "train_loss"}
                     for r in runs[chosen]],
        "by_weight_decay": {
            f"{wd:g}": dict(zip(("valid_auc_mean", "valid_auc_std"),
                                mean_std([r.valid_auc for r in rs]), strict=True))
            | dict(zip(("test_auc_mean", "test_auc_std"),
                       mean_std([r.test_auc for r in rs]), strict=True))
            for wd, rs in runs.items()},
        "like_rate_test_auc": like_rate_auc(test),
        "config": asdict(cfg),
    }
