"""`python predict.py --help`: see roc_jax/cli.py (the same as the `roc-predict` console script)."""

from roc_jax.cli import predict_main

if __name__ == "__main__":
    predict_main()
