"""One module per `minivae` subcommand (see minivae/cli.py), and what they share."""
import argparse


def layer_sizes(text: str) -> list[int]:
    """argparse type for ``--hidden``: '400' or '512,256' -> [400] / [512, 256]."""
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths such as 400 or "
                                         f"512,256, got {text!r}") from None
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return sizes


def number(low=None, strict=False, kind=float, high=None):
    """argparse type: a finite number (int or float) >= low (> low if strict) and <= high;
    argparse puts the flag's name in front of the message ("argument --lr: ...")."""
    import math

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a {'whole number' if kind is int else 'number'}, got {text!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and (v < low or (strict and v == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return v

    return parse


def writable_dir(out, flag="--out") -> list:
    """Refuse a directory flag that names a file or a place that cannot be written, before any
    work. -> the directories made for it (train.make_run_dir), for
    ``train.remove_made_dirs`` to remove again if the work fails before writing there."""
    import os
    import tempfile
    from pathlib import Path

    from ..cli import UserError
    from ..train import make_run_dir, remove_made_dirs

    if not str(out).strip():
        raise UserError(f"{flag} must name a directory, got ''")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file, not a directory")
    made = []
    try:
        made = make_run_dir(out)
        # a name of its own: two processes probing one directory do not remove each other's
        # probe, and a user's file is never touched
        fd, probe = tempfile.mkstemp(prefix=".minivae-write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        remove_made_dirs(made)
        raise UserError(f"{flag} {out}: cannot write there ({e.strerror or e})") from None
    return made
