"""ViT encoder: parity with transformers' CLIPVisionModel, ViTModel and Dinov2Model (tiny configs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from roc_jax.models import weights
from roc_jax.models.layers import bicubic_matrix
from roc_jax.models.vit import ViT, ViTConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    attn_implementation="eager",
)


def _hf_model(variant: str):
    torch.manual_seed(0)
    if variant == "clip":
        cfg = transformers.CLIPVisionConfig(**COMMON, intermediate_size=37)
        model = transformers.CLIPVisionModel(cfg)
    elif variant == "vit":
        cfg = transformers.ViTConfig(**COMMON, intermediate_size=37)
        model = transformers.ViTModel(cfg, add_pooling_layer=True)
    else:
        cfg = transformers.Dinov2Config(**COMMON, mlp_ratio=2, layerscale_value=0.5)
        model = transformers.Dinov2Model(cfg)
    model.eval()
    # Random layer norms / layer scales / class tokens, so a mis-mapped one cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "lambda" in name or "token" in name or "class" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=["clip", "vit", "dinov2"])
def pair(request, tmp_path_factory):
    """(HF PyTorch model, our ViT loaded from its saved folder, variant), once per variant."""
    variant = request.param
    pt = _hf_model(variant)
    # Through the on-disk format: transformers 5 renames modules in memory (q_proj, ...) but
    # save_pretrained writes the hub names, which are what the loader maps.
    folder = tmp_path_factory.mktemp(variant)
    pt.save_pretrained(folder)
    model, config, report = weights.load_vit(folder)
    assert config.variant == variant
    assert not report.missing and not report.unexpected
    return pt, model, variant


def _compare(pt, model, h: int, w: int, **kwargs):
    x = np.random.default_rng(0).normal(size=(2, 3, h, w)).astype(np.float32)
    with torch.inference_mode():
        out = pt(pixel_values=torch.from_numpy(x), **kwargs)
    ours = jax.jit(lambda m, v: m(v))(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
    ref = out.last_hidden_state.numpy()
    assert ours.shape == ref.shape == (2, 1 + (h // 8) * (w // 8), 32)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        np.asarray(model.pooled(ours)), out.pooler_output.numpy(), atol=1e-4, rtol=0
    )


def test_parity_native_size(pair):
    pt, model, _ = pair
    _compare(pt, model, 32, 32)


def test_parity_interpolated_positions(pair):
    pt, model, variant = pair
    kwargs = {} if variant == "dinov2" else {"interpolate_pos_encoding": True}
    _compare(pt, model, 48, 48, **kwargs)  # 4x4 -> 6x6 grid
    _compare(pt, model, 24, 40, **kwargs)  # non-square: 3x5 grid


def test_full_clip_checkpoint_loads_vision_tower(tmp_path):
    # openai/clip-vit-base-patch32 is a CLIPModel: 'vision_model.' prefix beside the text tower.
    torch.manual_seed(0)
    vision = {k: v for k, v in COMMON.items() if k != "attn_implementation"}
    cfg = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=20,
            vocab_size=64,
        ),
        vision_config=dict(vision, intermediate_size=37),
    )
    pt = transformers.CLIPModel(cfg).eval()
    pt.save_pretrained(tmp_path)
    model, spec, config = weights.load_image_encoder(tmp_path)
    assert config.variant == "clip" and config.hidden_act == "quick_gelu"
    assert spec == weights.DEFAULT_IMAGE_SPECS["clip"]
    _, _, report = weights.load_vit(tmp_path)
    assert report.ignored and not any(k.startswith("vision_model.") for k in report.ignored)
    assert "logit_scale" in report.ignored
    _compare(pt.vision_model, model, 32, 32)


def test_bicubic_matrix_matches_torch():
    g = torch.from_numpy(np.random.default_rng(3).normal(size=(1, 2, 37, 37)).astype(np.float64))
    for out in (16, 40, 5):
        ref = torch.nn.functional.interpolate(
            g, size=(out, out), mode="bicubic", align_corners=False
        )
        m = bicubic_matrix(37, out)
        ours = np.einsum("Hh,Ww,chw->cHW", m, m, g[0].numpy())
        np.testing.assert_allclose(ours, ref[0].numpy(), atol=1e-10)


def test_bad_pixel_layout_is_rejected():
    model = ViT(ViTConfig(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, 32, 32)))


def test_unknown_model_type_is_rejected():
    with pytest.raises(ValueError, match="model_type='bert' is not a supported image encoder"):
        ViTConfig.from_hf({"model_type": "bert"})


def test_bfloat16_compute_keeps_float32_params():
    model = ViT(ViTConfig(), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    out = model(jnp.zeros((1, 32, 32, 3)))
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 17, 64)
