"""Image decode, resize and normalization for the input pipeline (NHWC, float32).

``ImageSpec`` is what the image tower expects (``weights.load_image_encoder`` returns one, and
``roc_jax.models.weights`` re-exports it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """Input spec of an image tower: square side in pixels, per-channel RGB mean and std (0..1)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_image(path: str | Path, image_size: int) -> np.ndarray:
    """Decodes an image file to uint8 ``[S, S, 3]`` RGB, squashed to ``S = image_size`` (bicubic).

    Raises ``ValueError`` naming the file when it cannot be decoded.
    """
    try:
        with Image.open(path) as image:
            # JPEG: decode at a reduced scale (DCT domain) that is still >= the target size,
            # several times cheaper than a full decode of a large photo.
            image.draft("RGB", (image_size, image_size))
            image = image.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
            return np.asarray(image, np.uint8)
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from None


def resize_uint8(image: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> uint8 ``[S, S, 3]``; a no-op when the size already matches."""
    if image.shape[:2] == (image_size, image_size):
        return image
    pil = Image.fromarray(np.asarray(image, np.uint8))
    return np.asarray(pil.resize((image_size, image_size), Image.BICUBIC), np.uint8)


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 ``[..., 3]`` -> float32 ``(x / 255 - mean) / std`` of the same shape."""
    scale = np.asarray(std, np.float32) * 255.0
    offset = np.asarray(mean, np.float32) * 255.0
    return (images.astype(np.float32) - offset) / scale
