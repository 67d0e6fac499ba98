"""Command line for relation descriptions.

    python -m roc_jax.labels show [FILE] [--relation NAME ...]      # review, relation by relation
    python -m roc_jax.labels check FILE --labels rel2id.json         # complete for a label set?
    python -m roc_jax.labels separability [FILE] --encoder minilm-l6 # confusable relations?
    python -m roc_jax.labels generate --labels rel2id.json --backend openai|local|template \\
        --out FILE [--k 5] [--model M] [--base-url URL] [--model-path DIR] [--overwrite]

``show`` without FILE shows the shipped MNRE-2 file. ``generate`` reads the endpoint from
``ROC_LLM_BASE_URL`` / ``OPENAI_BASE_URL``, ``ROC_LLM_MODEL`` and ``OPENAI_API_KEY`` unless given.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from roc_jax.data.records import id2rel, load_rel2id
from roc_jax.labels import descriptions as D
from roc_jax.labels import generate as G


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m roc_jax.labels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print a descriptions file relation by relation")
    show.add_argument("file", nargs="?", default=None, help="default: the shipped MNRE-2 file")
    show.add_argument("--relation", action="append", default=None, help="only this relation")
    check = sub.add_parser("check", help="validate a descriptions file against a label file")
    check.add_argument("file")
    check.add_argument("--labels", required=True, help="rel2id.json")
    sep = sub.add_parser("separability",
                         help="leave-one-out retrieval of each description's relation")
    sep.add_argument("file", nargs="?", default=None, help="default: the shipped MNRE-2 file")
    sep.add_argument("--encoder", default="minilm-l6", help="text encoder preset or BERT folder")
    sep.add_argument("--max-len", type=int, default=64)
    gen = sub.add_parser("generate", help="generate descriptions for a label file")
    gen.add_argument("--labels", required=True, help="rel2id.json")
    gen.add_argument("--backend", required=True, choices=["openai", "local", "template"])
    gen.add_argument("--out", required=True)
    gen.add_argument("--k", type=int, default=5)
    gen.add_argument("--model", default=None, help="openai: model name (else ROC_LLM_MODEL)")
    gen.add_argument("--base-url", default=None, help="openai: endpoint (else ROC_LLM_BASE_URL)")
    gen.add_argument("--timeout", type=float, default=60.0)
    gen.add_argument("--max-retries", type=int, default=4)
    gen.add_argument("--model-path", default=None, help="local: a causal LM folder")
    gen.add_argument("--max-new-tokens", type=int, default=512)
    gen.add_argument("--overwrite", action="store_true")
    return p


def make_backend(args: argparse.Namespace) -> G.Backend:
    """The backend named on the command line."""
    if args.backend == "openai":
        return G.OpenAIChatBackend.from_env(base_url=args.base_url, model=args.model,
                                            timeout=args.timeout, max_retries=args.max_retries)
    if args.backend == "local":
        if not args.model_path:
            raise G.GenerationError("--backend local needs --model-path DIR")
        return G.LocalLMBackend(args.model_path, max_new_tokens=args.max_new_tokens)
    return G.TemplateBackend()


def separability_report(path, encoder: str, max_len: int = 64) -> str:
    """Encodes a descriptions file with a BERT text tower and reports leave-one-out retrieval."""
    from roc_jax.labels import cache as C
    from roc_jax.labels import review
    from roc_jax.models import weights

    texts = D.load_descriptions(path)
    bert, tokenizer, _ = weights.load_text_encoder(encoder)
    cache = C.encode_descriptions(texts, list(texts), C.text_encode_fn(bert, tokenizer, max_len),
                                  C.fingerprint(texts, C.encoder_params(bert)))
    header = f"{path}: {len(texts)} relations, encoder {encoder} (D={cache.dim})\n"
    return header + review.format_separability(review.leave_one_out(cache))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (errors are printed, not raised)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "show":
            path = args.file or D.default_mnre_path()
            sys.stdout.write(f"file: {path}\n")
            sys.stdout.write(D.format_for_review(D.read_descriptions_file(path), args.relation))
        elif args.cmd == "separability":
            print(separability_report(args.file or D.default_mnre_path(), args.encoder,
                                      args.max_len), end="")
        elif args.cmd == "check":
            names = id2rel(load_rel2id(args.labels))
            D.load_descriptions(args.file, names)
            print(f"{args.file}: complete for the {len(names)} labels of {args.labels}")
        else:
            names = id2rel(load_rel2id(args.labels))
            backend = make_backend(args)
            G.generate_descriptions(names, backend, args.out, k=args.k, overwrite=args.overwrite,
                                    meta={"labels_file": str(args.labels)})
            print(f"wrote {len(names)} relations to {args.out} ({backend.name}); review it with: "
                  f"python -m roc_jax.labels show {args.out}")
    except (D.DescriptionsError, G.GenerationError, FileNotFoundError, FileExistsError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
