"""Traditional sequential recommenders on TALLRec's K-shot samples (GRU4Rec, Caser, SASRec,
GRU-text): the paper's comparison, trained on item ids instead of prompts."""

from baselines.models import MODELS, ModelConfig, SeqRecommender, mse_loss
from baselines.train import (
    WEIGHT_DECAYS,
    BaselineConfig,
    RunResult,
    run_baseline_grid,
    select_weight_decay,
    train_baseline,
)

__all__ = [
    "MODELS", "ModelConfig", "SeqRecommender", "mse_loss", "WEIGHT_DECAYS", "BaselineConfig",
    "RunResult", "run_baseline_grid", "select_weight_decay", "train_baseline",
]
