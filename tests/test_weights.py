"""Weight loading: the offline DINOv2 conversion (vs onnxruntime and transformers), hub presets
without a network, and the error paths (wrong architecture, shapes, corrupt files, keys)."""

import json
import socket

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from roc_jax.models import convert_onnx, weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY_BERT = dict(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=32,
)
TINY_DINO = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    mlp_ratio=2,
    image_size=28,
    patch_size=14,
)


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
    """The converted dinov2-s14-offline folder, in a private cache (converted once here)."""
    return convert_onnx.converted_folder(cache_root=tmp_path_factory.mktemp("roc_cache"))


@pytest.fixture
def bert_folder(tmp_path):
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**TINY_BERT)).save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture
def closed_hub(monkeypatch, tmp_path):
    """Hub endpoint on a closed local port and an empty HF cache: the hub is unreachable."""
    import huggingface_hub.constants as hub_constants

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there any more: connections are refused
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    return cache


# ----------------------------------------------------------------------------- dinov2-s14-offline


def test_dinov2_offline_matches_onnx_backbone_and_transformers(dinov2_folder):
    import onnx
    import onnxruntime as ort

    model, spec, config = weights.load_image_encoder(dinov2_folder)
    assert (config.variant, config.hidden_size, config.num_hidden_layers) == ("dinov2", 384, 12)
    assert (config.num_attention_heads, config.patch_size, config.image_size) == (6, 14, 518)
    assert spec == weights.ImageSpec(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    # Expose the backbone's last_hidden_state (the final layernorm's output) as a graph output.
    graph = onnx.load(str(convert_onnx.find_onnx_file()))
    name = convert_onnx.backbone_output_name(graph)
    graph.graph.output.append(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    )
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    ref_onnx = sess.run([name], {"input_image": x})[0]

    pt = transformers.Dinov2Model.from_pretrained(str(dinov2_folder), attn_implementation="eager")
    with torch.inference_mode():
        ref_hf = pt.eval()(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    ours = np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 1))))
    assert ours.shape == ref_onnx.shape == (2, 1 + 16 * 16, 384)
    # Real weights: |activations| reach ~10, and 12 layers of float32 summation order differ
    # between XLA, onnxruntime and torch (measured ~2e-5); 1e-4 is a relative error of ~1e-5.
    assert np.abs(ref_onnx).max() > 1.0
    np.testing.assert_allclose(ours, ref_onnx, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours, ref_hf, atol=1e-4, rtol=0)


def test_dinov2_offline_conversion_is_cached(tmp_path):
    first = convert_onnx.converted_folder(cache_root=tmp_path)
    digest = convert_onnx.file_sha256(convert_onnx.find_onnx_file())
    assert first.name == f"dinov2-s14-offline-{digest[:16]}"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert convert_onnx.converted_folder(cache_root=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary leftovers
    tensors = load_file(str(first / "model.safetensors"))
    assert tensors["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    assert tensors["encoder.layer.11.mlp.fc1.weight"].shape == (1536, 384)


def test_dinov2_offline_preset_uses_roc_jax_cache(monkeypatch, tmp_path, dinov2_folder):
    monkeypatch.setenv("ROC_JAX_CACHE", str(dinov2_folder.parent))
    assert weights.resolve("dinov2-s14-offline") == dinov2_folder


# ----------------------------------------------------------------------------- hub presets


def test_unreachable_hub_names_preset_repo_and_offline_presets(closed_hub):
    with pytest.raises(weights.PresetUnavailableError) as err:
        weights.load_image_encoder("dinov2-s14")
    msg = str(err.value)
    assert "'dinov2-s14'" in msg and "facebook/dinov2-small" in msg
    assert "minilm-l6" in msg and "dinov2-s14-offline" in msg
    with pytest.raises(weights.PresetUnavailableError, match="google-bert/bert-base-uncased"):
        weights.load_text_encoder("bert-base-uncased")


def test_cached_hub_preset_loads_without_network(closed_hub):
    # Lay out the HF cache as snapshot_download leaves it, holding a tiny DINOv2.
    repo = closed_hub / "models--facebook--dinov2-small"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    torch.manual_seed(0)
    transformers.Dinov2Model(transformers.Dinov2Config(**TINY_DINO)).save_pretrained(snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model, spec, config = weights.load_image_encoder("dinov2-s14")
    assert config.hidden_size == 16 and spec.image_size == 224
    assert model(jnp.zeros((1, 28, 28, 3))).shape == (1, 5, 16)


def test_minilm_preset_gives_tokenizer_from_its_folder():
    model, tokenizer, config = weights.load_text_encoder("minilm-l6")
    assert tokenizer("hello world")["input_ids"] == [101, 7592, 2088, 102]
    assert config.vocab_size == tokenizer.vocab_size == 30522
    assert model.pooler is not None


# ----------------------------------------------------------------------------- error paths


def test_unknown_name_is_rejected():
    with pytest.raises(weights.WeightLoadError, match="neither a preset"):
        weights.load_text_encoder("no-such-preset")


def test_wrong_architecture_folder(bert_folder, tmp_path_factory):
    with pytest.raises(ValueError, match="model_type='bert' is not a supported image encoder"):
        weights.load_image_encoder(bert_folder)
    vit_dir = tmp_path_factory.mktemp("vit")
    transformers.Dinov2Model(transformers.Dinov2Config(**TINY_DINO)).save_pretrained(vit_dir)
    with pytest.raises(ValueError, match="model_type='dinov2', expected 'bert'"):
        weights.load_text_encoder(vit_dir)


def test_shape_mismatch_names_key_and_shapes(bert_folder):
    cfg = json.loads((bert_folder / "config.json").read_text())
    cfg["intermediate_size"] = 30
    (bert_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(weights.WeightLoadError) as err:
        weights.load_bert(bert_folder)
    msg = str(err.value)
    assert "model.safetensors: shape mismatch for 'encoder.layer.0.intermediate.dense" in msg
    assert "checkpoint (24" in msg and "expects (" in msg and "30" in msg


def test_corrupt_safetensors(bert_folder):
    path = bert_folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(weights.WeightLoadError, match="model.safetensors: cannot read safetensors"):
        weights.load_bert(bert_folder)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(weights.WeightLoadError, match="cannot read safetensors"):
        weights.load_bert(bert_folder)


def test_missing_config_and_invalid_json(tmp_path):
    with pytest.raises(weights.WeightLoadError, match="no config.json"):
        weights.load_bert(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert",\n  oops}')
    with pytest.raises(weights.WeightLoadError, match="config.json: line 2: invalid JSON"):
        weights.load_bert(tmp_path)


def test_missing_key_fails_unless_allowed(bert_folder):
    path = bert_folder / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["encoder.layer.0.output.dense.bias"]
    save_file(tensors, str(path))
    with pytest.raises(
        weights.WeightLoadError, match=r"missing.*encoder.layer.0.output.dense.bias"
    ):
        weights.load_bert(bert_folder)
    model, _, report = weights.load_bert(bert_folder, allow_missing=["*.output.dense.bias"])
    assert report.missing == ["encoder.layer.0.output.dense.bias"]
    np.testing.assert_array_equal(np.asarray(model.layers[0].output.bias[...]), 0.0)


def test_unexpected_key_fails(bert_folder):
    path = bert_folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors["encoder.layer.0.adapter.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(path))
    with pytest.raises(weights.WeightLoadError, match="unexpected key.*adapter.weight"):
        weights.load_bert(bert_folder)


def test_pretraining_checkpoint_heads_are_reported_not_loaded(tmp_path):
    # bert-base-uncased ships BertForPreTraining weights: 'bert.' prefix, 'cls.' heads.
    torch.manual_seed(0)
    pt = transformers.BertForPreTraining(transformers.BertConfig(**TINY_BERT)).eval()
    pt.save_pretrained(tmp_path)
    model, _, report = weights.load_bert(tmp_path)
    assert report.ignored and all(k.startswith("cls.") for k in report.ignored)
    assert not report.missing
    ids = np.array([[5, 6, 7, 0]])
    mask = np.array([[1, 1, 1, 0]])
    with torch.inference_mode():
        ref = pt.bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    ours = model(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(ours), ref.last_hidden_state.numpy(), atol=1e-4, rtol=0)
