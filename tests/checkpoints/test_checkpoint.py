import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import blt_decode as bd
from blt_decode.errors import CheckpointError


@pytest.fixture
def saved(tmp_path):
    model = bd.random_model("tiny", 7)
    bd.save_model(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_round_trip_gives_identical_generation(saved):
    model, path = saved
    loaded = bd.load_model(str(path))
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert bd.generate(loaded, "ab", max_new_bytes=10).output == bd.generate(model, "ab", max_new_bytes=10).output


def test_load_with_dtype(saved):
    _, path = saved
    assert bd.load_model(path, dtype=torch.float64).dtype == torch.float64


def _rewrite(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.pop("local_decoder.output.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'local_decoder.output.weight'"):
        bd.load_model(path)


def test_unexpected_tensor_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.__setitem__("extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'extra.weight'"):
        bd.load_model(path)


def test_wrong_shape_names_tensor_and_shapes(saved):
    _, path = saved
    _rewrite(path, lambda t: t.__setitem__("global_transformer.layers.0.attention.wq.weight", torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=r"global_transformer.layers.0.attention.wq.weight.*\(3, 3\).*\(64, 64\)"):
        bd.load_model(path)


def test_truncated_file_is_reported(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        bd.load_model(path)


def test_bad_config_field_is_reported(saved):
    _, path = saved
    payload = json.loads((path / "config.json").read_text())
    payload["config"]["encoder"]["n_heads"] = 3
    (path / "config.json").write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="n_heads"):
        bd.load_model(path)


def test_unknown_spec_is_explained(tmp_path):
    with pytest.raises(bd.UnknownModelError, match="neither a directory"):
        bd.load_model(tmp_path / "nowhere")
    with pytest.raises(bd.UnknownModelError):
        bd.load_model("random:tiny:x")
