"""`python eval.py --help`: see roc_jax/cli.py (the same as the `roc-eval` console script)."""

from roc_jax.cli import eval_main

if __name__ == "__main__":
    eval_main()
