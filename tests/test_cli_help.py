"""Every flag of the user-facing CLIs explains itself in --help."""
import argparse

import pytest

from data.prepare import build_parser as prepare_parser
from engine.config import build_parser as train_parser
from engine.evaluation import build_parser as evaluate_parser
from engine.experiments.__main__ import build_parser as experiments_parser


def _flags_without_help(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _flags_without_help(sub, f"{prefix}{name} ")
        elif not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
            missing.append(prefix + "/".join(action.option_strings or [action.dest]))
    return missing


@pytest.mark.parametrize("name, parser", [
    ("train.py --stage it", lambda: train_parser("it")),
    ("train.py --stage rt", lambda: train_parser("rt")),
    ("evaluate.py", evaluate_parser),
    ("python -m engine.experiments", experiments_parser),
    ("python -m data.prepare", prepare_parser),
])
def test_every_flag_has_help(name, parser):
    assert _flags_without_help(parser()) == [], f"{name}: flags without --help text"
