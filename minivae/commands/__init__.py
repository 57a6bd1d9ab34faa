"""One module per `minivae` subcommand (see minivae/cli.py)."""
