"""Argument types shared by `attn-jax` (main.py) and `attn-jax bench` (bench/cli.py): one mistake, one message."""

import argparse


def count(text: str) -> int:
    """A whole number of at least 1 (how many checkpoints to average, say); anything else is argparse's usage error."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)
