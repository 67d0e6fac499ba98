"""`python train.py --help`: see roc_jax/cli.py (the same as the `roc-train` console script)."""

from roc_jax.cli import train_main

if __name__ == "__main__":
    train_main()
