"""The data pipeline, used by the engine and the CLIs; imports nothing from model/ or engine/.

prompts.py (TALLRec's prompt text and record format) · records.py (reading and writing the
JSON splits) · fewshot.py (the domains, K-shot sampling) · toy.py (the synthetic toy domain) ·
movielens.py, bookcrossing.py, prepare.py (rebuilding TALLRec's splits from the raw data) ·
history.py (recent or retrieved user histories) · items.py (item ids for the ID baselines) ·
collate.py (tokenized examples, cutoff, batches; IGNORE_INDEX) · stats.py (prompt lengths
under a given tokenizer). Where the data lives comes from the top-level leaf paths.py.
"""
