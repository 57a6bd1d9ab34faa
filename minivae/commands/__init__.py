"""One module per `minivae` subcommand (see minivae/cli.py), and what they share."""
import argparse


def layer_sizes(text: str) -> list[int]:
    """argparse type for ``--hidden``: '400' or '512,256' -> [400] / [512, 256]; '' -> []."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return sizes
