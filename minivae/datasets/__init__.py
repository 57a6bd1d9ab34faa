"""Data shipped with minivae: the MNIST test set (the ``mnist10k`` default), see README.md here."""
