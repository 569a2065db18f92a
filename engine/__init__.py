"""Training and evaluation on top of model/ and data/; the CLIs train.py and evaluate.py are
thin wrappers of config.py and evaluation.py.

config.py (TrainConfig, its presets and flags) · train.py (the training loop, `train(cfg)`) ·
evaluation.py (EvalConfig, `evaluate(cfg)`) · scoring.py (P(Yes) in one forward pass, AUC) ·
loss.py (chunked cross-entropy) · precision.py (precision policies and their autocast) ·
memory/ (the memory planner) · state.py (run folders, checkpoints, RNG) · preflight.py
(every check before a run writes or loads anything) · stats.py (prompt
lengths, `python -m engine.stats`) · experiments/ (TALLRec's grid, `python -m engine.experiments`).
"""
