"""`python -m engine.prepare`: `python -m data.prepare` plus the option that needs a model.

`movielens --history-select semantic` (retrieved histories, after ReLLa) ranks history items by
the similarity of their title embeddings, computed with a base model. data/ never loads a model
(the arrows go CLIs -> engine -> model, data used by both), so this entry point hands
data.prepare the engine's title embedder; every other command is data.prepare's own.
"""

import sys

from data.prepare import main as prepare_main
from engine.embed import semantic_selector_factory


def main(argv: list[str] | None = None) -> int:
    return prepare_main(argv, make_semantic=semantic_selector_factory)


if __name__ == "__main__":
    sys.exit(main())
