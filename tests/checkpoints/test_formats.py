"""Checkpoint formats without transformers: detection, round trips, and every loading error named.

The transformers cross-check lives in test_hf_crosscheck.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import blt_decode
from blt_decode import cli
from blt_decode.checkpoints import native
from blt_decode.checkpoints import formats
from blt_decode.checkpoints import hf, original
from blt_decode.errors import BLTDecodeError, CheckpointError, ConfigError, UnknownModelError
from blt_decode.model.blt import BLTModel, init_weights
from blt_decode.model.config import BLTConfig, TransformerConfig


def stack(dim: int, layers: int, heads: int, ffn: int, window: int | None, **kw) -> TransformerConfig:
    return TransformerConfig(dim=dim, n_layers=layers, n_heads=heads, ffn_dim=ffn, sliding_window=window, **kw)


#: a tiny config every format can express (the entropy model as the original loader runs it: window 512,
#: rotary base 10000); FFN widths follow the original formula with multiple_of=32
CONFIG = BLTConfig(
    encoder=stack(32, 1, 2, 96, 16, rope_theta=500000.0),
    global_=stack(48, 2, 4, 128, None, n_kv_heads=2, rope_theta=500000.0),
    decoder=stack(32, 2, 2, 96, 16, rope_theta=500000.0),
    entropy_model=stack(32, 1, 2, 96, 512),
    cross_attn_k=2,
    encoder_hash_byte_group_size=(3, 4),
    encoder_hash_byte_group_vocab=61,
    encoder_hash_byte_group_nb_functions=2,
    patching_threshold=5.4,
    max_seqlen=512,
)


def make_model(config: BLTConfig = CONFIG, seed: int = 0) -> BLTModel:
    model = init_weights(BLTModel(config), torch.Generator().manual_seed(seed))
    with torch.no_grad():  # norms away from 1 so that a swapped norm cannot go unnoticed
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model.eval()


def tensors_equal(a: BLTModel, b: BLTModel) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


IDS = torch.tensor([[1] + [b + 4 for b in b"The quick brown fox jumps over the lazy dog; 0123456789 \xff\x00"]])


@pytest.fixture(scope="module")
def model() -> BLTModel:
    return make_model()


@pytest.fixture()
def saved(tmp_path: Path, model: BLTModel):
    """A function writing ``model`` in a format and returning the directory."""

    def write(fmt: str, **kwargs) -> Path:
        path = tmp_path / fmt
        if fmt == "original-train":
            original.save_original(model, path, layout="training")
        else:
            formats.save_checkpoint(model, path, fmt)
        return path

    return write


# -- detection and round trips ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["native", "hf", "original", "original-train"])
def test_detect_and_round_trip_bit_identical(fmt, saved, model):
    path = saved(fmt)
    assert formats.detect_format(path) == fmt
    loaded = formats.load_checkpoint(path)
    assert loaded.config == model.config
    assert tensors_equal(loaded, model)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))


@pytest.mark.parametrize("fmt", ["native", "hf", "original", "original-train"])
def test_loaded_parameters_own_aligned_contiguous_storage(fmt, saved):
    """Weights read from a file are views into its buffer (safetensors) at arbitrary byte offsets; kernels
    on misaligned data are slower and round differently (the [hf] round trip above differed by ~1e-6).
    Every parameter must own a fresh, contiguous, 64-byte aligned allocation."""
    loaded = formats.load_checkpoint(saved(fmt))
    storages = set()
    for name, p in loaded.named_parameters():
        nbytes = p.numel() * p.element_size()
        assert p.is_contiguous(), name
        assert p.storage_offset() == 0, (name, p.storage_offset())
        assert p.untyped_storage().nbytes() == nbytes, (name, p.untyped_storage().nbytes(), nbytes)
        assert p.data_ptr() % 64 == 0, (name, p.data_ptr() % 64)
        storages.add(p.untyped_storage().data_ptr())
    assert len(storages) == len(list(loaded.parameters()))  # no two parameters share memory


def test_files_of_each_layout(saved):
    assert {p.name for p in saved("hf").iterdir()} == {"config.json", "model.safetensors"}
    released = saved("original")
    assert {str(p.relative_to(released)) for p in released.rglob("*") if p.is_file()} == {
        "config.json", "model.safetensors", "entropy_model/params.json", "entropy_model/consolidated.pth"}
    assert "args" in json.loads((released / "config.json").read_text())
    params = json.loads((released / "entropy_model/params.json").read_text())
    assert params["data"]["patcher_args"]["threshold"] == CONFIG.patching_threshold
    weights = torch.load(released / "entropy_model/consolidated.pth", weights_only=True)
    assert set(weights) == {"model"} and "tok_embeddings.weight" in weights["model"]
    train = saved("original-train")
    assert set(torch.load(train / "consolidated.pth", weights_only=True)) == {"model"}


def test_hf_names_and_fused_hash_table(saved, model):
    tensors = load_file(str(saved("hf") / "model.safetensors"))
    for name in ("lm_head.weight", "model.local_encoder.embed_tokens.weight", "model.patcher.lm_head.weight",
                 "model.local_encoder.layers.0.self_attn.q_proj.weight", "model.local_decoder.layers.1.mlp.gate_proj.weight",
                 "model.local_decoder.cross_attn_layers.1.q_norm.weight", "model.local_encoder.cross_attn_layers.0.k_norm.weight",
                 "model.global_transformer.token_embedding_projection.weight", "model.patcher.layers.0.post_attention_layernorm.weight"):
        assert name in tensors, name
    assert not any("attention.wq" in k or "feed_forward" in k for k in tensors)
    fused = tensors["model.encoder_hash_tok_embedding.weight"]
    vocab = CONFIG.encoder_hash_byte_group_vocab
    assert fused.shape == (4 * vocab, 32)
    for i in range(4):  # table i owns rows [i*vocab, (i+1)*vocab)
        assert torch.equal(fused[i * vocab : (i + 1) * vocab], model.encoder_hash_tok_embedding[i].weight)
    assert torch.equal(tensors["lm_head.weight"], model.local_decoder.output.weight)
    assert torch.equal(tensors["model.local_decoder.layers.1.mlp.down_proj.weight"],
                       model.local_decoder.layers[1].feed_forward.w2.weight)


def test_hf_sharded_index(saved, model):
    path = saved("hf")
    tensors = load_file(str(path / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, str(path / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, str(path / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(names)}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "model.safetensors").unlink()
    assert formats.detect_format(path) == "hf"
    assert tensors_equal(formats.load_checkpoint(path), model)


def test_load_model_options_and_dispatch(saved, model):
    for fmt in ("native", "hf", "original"):
        loaded = blt_decode.load_model(saved(fmt), dtype=torch.bfloat16, device="cpu")
        assert loaded.dtype == torch.bfloat16 and loaded.device.type == "cpu"
        assert torch.equal(loaded.local_decoder.output.weight, model.local_decoder.output.weight.to(torch.bfloat16))
    # the API's other entry points take a checkpoint directory of any layout too
    assert blt_decode.score(saved("original"), "hello").bits_per_byte == pytest.approx(
        blt_decode.score(model, "hello").bits_per_byte, abs=1e-6)


def test_bf16_round_trip_keeps_dtype(saved, tmp_path, model):
    bf16 = formats.load_checkpoint(saved("native"), dtype=torch.bfloat16)
    for fmt in ("native", "hf", "original"):
        formats.save_checkpoint(bf16, tmp_path / f"bf16-{fmt}", fmt)
        again = formats.load_checkpoint(tmp_path / f"bf16-{fmt}", dtype=torch.bfloat16)
        assert tensors_equal(again, bf16)


# -- detection errors -----------------------------------------------------------------------------------
def test_unrecognised_directory_says_what_it_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UnknownModelError) as err:
        blt_decode.load_model(tmp_path)
    message = str(err.value)
    for needle in ("model.safetensors", "params.json + consolidated.pth", '"model_type": "blt"', '"args"', "notes.txt"):
        assert needle in message


def test_missing_path_and_file_path(tmp_path):
    with pytest.raises(UnknownModelError, match="neither a directory"):
        blt_decode.load_model(tmp_path / "nope")
    (tmp_path / "f").write_text("")
    with pytest.raises(UnknownModelError, match="not a directory"):
        formats.load_checkpoint(tmp_path / "f")


# -- tensor errors: missing, unexpected, shape ---------------------------------------------------------
def _edit_safetensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _edit_pth(path: Path, edit) -> None:
    obj = torch.load(path, weights_only=True)
    edit(obj["model"])
    torch.save(obj, path)


@pytest.mark.parametrize("fmt,file,name", [
    ("hf", "model.safetensors", "model.local_decoder.layers.1.self_attn.v_proj.weight"),
    ("hf", "model.safetensors", "model.encoder_hash_tok_embedding.weight"),
    ("original", "model.safetensors", "local_encoder.cross_attn_layers.0.wk.weight"),
    ("original", "entropy_model/consolidated.pth", "layers.0.ffn_norm.weight"),
    ("original-train", "consolidated.pth", "global_transformer.layers.1.attention.wo.weight"),
    ("native", "model.safetensors", "local_decoder.norm.weight"),
])
def test_missing_tensor_is_named(fmt, file, name, saved):
    path = saved(fmt)
    edit = (lambda t: t.pop(name))
    (_edit_pth if file.endswith(".pth") else _edit_safetensors)(path / file, edit)
    with pytest.raises(CheckpointError, match=rf"missing tensor '{name}'") as err:
        formats.load_checkpoint(path)
    assert file in str(err.value)


@pytest.mark.parametrize("fmt,file", [("hf", "model.safetensors"), ("original", "model.safetensors"),
                                      ("original", "entropy_model/consolidated.pth"), ("native", "model.safetensors")])
def test_unexpected_tensor_is_named(fmt, file, saved):
    path = saved(fmt)
    extra = lambda t: t.__setitem__("local_encoder.layers.7.attention.wq.weight", torch.zeros(2, 2))
    (_edit_pth if file.endswith(".pth") else _edit_safetensors)(path / file, extra)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'local_encoder\.layers\.7\.attention\.wq\.weight'"):
        formats.load_checkpoint(path)


@pytest.mark.parametrize("fmt,file,name,shape", [
    ("hf", "model.safetensors", "model.global_transformer.layers.0.self_attn.k_proj.weight", (24, 48)),
    ("hf", "model.safetensors", "model.encoder_hash_tok_embedding.weight", (244, 32)),
    ("original", "model.safetensors", "encoder_hash_tok_embedding.3.weight", (61, 32)),
    ("original", "entropy_model/consolidated.pth", "output.weight", (260, 32)),
])
def test_shape_mismatch_names_tensor_expected_and_found(fmt, file, name, shape, saved):
    path = saved(fmt)
    def edit(t):
        t[name] = torch.zeros(shape[0] + 1, *shape[1:])
    (_edit_pth if file.endswith(".pth") else _edit_safetensors)(path / file, edit)
    found = (shape[0] + 1, *shape[1:])
    with pytest.raises(CheckpointError) as err:
        formats.load_checkpoint(path)
    message = str(err.value)
    assert name in message and str(found) in message and str(tuple(shape)) in message


def test_non_finite_tensor_is_named(saved):
    path = saved("hf")
    _edit_safetensors(path / "model.safetensors",
                      lambda t: t["model.patcher.norm.weight"].__setitem__(0, float("nan")))
    with pytest.raises(CheckpointError, match=r"'entropy_model\.norm\.weight' holds NaN"):
        formats.load_checkpoint(path)


# -- config errors: missing field, out of range ---------------------------------------------------------
def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("fmt,file,edit,needle", [
    ("hf", "config.json", lambda d: d["encoder_config"].pop("hidden_size"), "'encoder_config.hidden_size' is missing"),
    ("hf", "config.json", lambda d: d.pop("patcher_config"), "'patcher_config' is missing"),
    ("original", "config.json", lambda d: d["args"].pop("dim_global"), "'args.dim_global' is missing"),
    ("original", "entropy_model/params.json", lambda d: d["entropy_model"].pop("n_layers"), "'entropy_model.n_layers' is missing"),
    ("original-train", "params.json", lambda d: d["model"].pop("cross_attn_nheads"), "'model.cross_attn_nheads' is missing"),
    ("native", "config.json", lambda d: d["config"]["encoder"].pop("dim"), "dim"),
])
def test_missing_config_field_is_named(fmt, file, edit, needle, saved):
    path = saved(fmt)
    _edit_json(path / file, edit)
    with pytest.raises(CheckpointError) as err:
        formats.load_checkpoint(path)
    assert needle in str(err.value) and file.split("/")[-1] in str(err.value)


@pytest.mark.parametrize("fmt,file,edit,needle", [
    ("hf", "config.json", lambda d: d["decoder_config"].__setitem__("num_hidden_layers", -1),
     "'decoder_config.num_hidden_layers' is out of range: must be >= 0, got -1"),
    ("hf", "config.json", lambda d: d["global_config"].__setitem__("num_attention_heads", 5),
     "dim 48 is not divisible by n_heads 5"),
    ("hf", "config.json", lambda d: d.__setitem__("local_attention_window_len", 0),
     "'local_attention_window_len' is out of range: must be >= 1, got 0"),
    ("hf", "config.json", lambda d: d.__setitem__("patching_threshold", "high"),
     "'patching_threshold' must be a finite number"),
    ("hf", "config.json", lambda d: d.__setitem__("vocab_size", 256), "'vocab_size' must be 260"),
    ("original", "config.json", lambda d: d["args"].__setitem__("cross_attn_k", 0),
     "'args.cross_attn_k' is out of range: must be >= 1, got 0"),
    ("original", "config.json", lambda d: d["args"].__setitem__("norm_eps", -1.0),
     "'args.norm_eps' is out of range: must be > 0"),
    ("original", "entropy_model/params.json", lambda d: d["data"]["patcher_args"].__setitem__("max_patch_length", 0),
     "'data.patcher_args.max_patch_length' is out of range"),
])
def test_out_of_range_config_field_is_named(fmt, file, edit, needle, saved):
    path = saved(fmt)
    _edit_json(path / file, edit)
    with pytest.raises(CheckpointError) as err:
        formats.load_checkpoint(path)
    assert needle in str(err.value)


@pytest.mark.parametrize("fmt,edit,needle", [
    ("hf", lambda d: d.__setitem__("patch_in_forward", False), "'patch_in_forward'"),
    ("hf", lambda d: d["encoder_config"].__setitem__("cross_attn_all_layers", True), "'encoder_config.cross_attn_all_layers'"),
    ("hf", lambda d: d["global_config"].__setitem__("rope_parameters", {"rope_type": "yarn", "factor": 2.0}), "rope_type"),
    ("hf", lambda d: d["decoder_config"].__setitem__("hidden_size_global", 64), "'decoder_config.hidden_size_global' is 64"),
    ("original", lambda d: d["args"].__setitem__("cross_attn_encoder", False), "'args.cross_attn_encoder' is False"),
    ("original", lambda d: d["args"].__setitem__("downsampling_by_pooling", "avg,max"), "'args.downsampling_by_pooling'"),
])
def test_unsupported_architecture_is_refused_not_approximated(fmt, edit, needle, saved):
    path = saved(fmt)
    _edit_json(path / "config.json", edit)
    with pytest.raises(CheckpointError, match=needle):
        formats.load_checkpoint(path)


def test_original_without_entropy_model_says_where_it_looked(saved):
    path = saved("original")
    shutil.rmtree(path / "entropy_model")
    with pytest.raises(CheckpointError, match=r"entropy_model/params\.json and .*entropy_model/consolidated\.pth"):
        formats.load_checkpoint(path)


# -- truncated and unsafe files ---------------------------------------------------------------------------
def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("fmt,file", [
    ("hf", "model.safetensors"), ("original", "model.safetensors"), ("original", "entropy_model/consolidated.pth"),
    ("original-train", "consolidated.pth"), ("native", "model.safetensors"),
    ("hf", "config.json"), ("original", "entropy_model/params.json"),
])
def test_truncated_file_is_named(fmt, file, saved):
    path = saved(fmt)
    _truncate(path / file)
    with pytest.raises((CheckpointError, UnknownModelError)) as err:
        formats.load_checkpoint(path)
    assert file.split("/")[-1] in str(err.value)
    assert "truncated" in str(err.value) or "not valid JSON" in str(err.value)


class _Exploit:
    def __reduce__(self):
        return (Path.write_text, (Path(_Exploit.target), "pwned"))


def test_pickled_code_is_refused_not_executed(saved, tmp_path):
    path = saved("original")
    _Exploit.target = str(tmp_path / "side_effect")
    torch.save({"model": {"norm.weight": torch.ones(32)}, "payload": _Exploit()}, path / "entropy_model/consolidated.pth")
    with pytest.raises(CheckpointError, match="refusing to execute pickled code"):
        formats.load_checkpoint(path)
    assert not (tmp_path / "side_effect").exists()


@pytest.mark.parametrize("write", ["plain pickle", "torch.save"])
def test_a_refused_pickle_is_one_line_without_torchs_warning_or_advice(saved, tmp_path, write):
    """A plain pickle (protocol 4) made torch print a three-line warning before the one error line, and
    torch's own message advises loading with weights_only=False, which would run the code."""
    import os
    import pickle
    import subprocess
    import sys

    path = saved("original")
    _Exploit.target = str(tmp_path / "side_effect")
    payload = {"model": {"norm.weight": torch.ones(32)}, "payload": _Exploit()}
    target = path / "entropy_model/consolidated.pth"
    if write == "plain pickle":
        target.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, target)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # warnings shown, as a user sees them
    run = subprocess.run([sys.executable, "-m", "blt_decode.cli", "generate", "--model", str(path), "x"],
                         capture_output=True, text=True, env=env)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert "refusing to execute pickled code" in lines[0] and "consolidated.pth" in lines[0]
    assert "weights_only" not in lines[0] and ("GLOBAL" in lines[0] or "Unsupported" in lines[0]), lines[0]
    assert not (tmp_path / "side_effect").exists()


# -- corrupted checkpoints: one typed line naming the file and the field ----------------------------------
def _json(file: str, edit):
    """A corruption that edits the JSON object in ``file``."""
    return lambda path: _edit_json(path / file, edit)


def _raw(file: str, data: bytes):
    """A corruption that replaces ``file`` with ``data``."""
    return lambda path: (path / file).write_bytes(data)


def _tensor(file: str, name: str, tensor: torch.Tensor):
    """A corruption that replaces one tensor of a safetensors or .pth file."""
    return lambda path: (_edit_pth if file.endswith(".pth") else _edit_safetensors)(
        path / file, lambda t: t.__setitem__(name, tensor))


def _sharded(entry):
    """Turn an HF checkpoint into a one-shard index whose first weight_map entry is ``entry(path)``."""

    def corrupt(path: Path) -> None:
        (path / "model.safetensors").rename(path / "shard.safetensors")
        names = sorted(load_file(str(path / "shard.safetensors")))
        weight_map = {n: "shard.safetensors" for n in names}
        weight_map[names[0]] = entry(path)
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    return corrupt


def _outside(path: Path) -> Path:
    """A complete, loadable shard outside the checkpoint directory (what a traversal would read)."""
    other = path.parent / "other"
    other.mkdir(exist_ok=True)
    shutil.copy(path / "shard.safetensors", other / "model.safetensors")
    return other / "model.safetensors"


def _dotdot_outside(path: Path) -> str:
    _outside(path)
    return "../other/model.safetensors"


def _symlink_outside(path: Path) -> str:
    (path / "link.safetensors").symlink_to(_outside(path))
    return "link.safetensors"


NOT_UTF8 = b'{"format": "blt-decode", "model_type": "blt", "note": "caf\xe9"}'

CORRUPT = [
    # native config.json: every field type-checked, sub-configs must be objects
    ("native", _json("config.json", lambda d: d["config"].__setitem__("encoder", None)), ("config.json", "encoder", "object", "None")),
    ("native", _json("config.json", lambda d: d["config"].__setitem__("decoder", [32, 2])), ("config.json", "decoder", "object")),
    ("native", _json("config.json", lambda d: d["config"].__setitem__("entropy_model", "small")), ("config.json", "entropy_model", "object", "or null")),
    ("native", _json("config.json", lambda d: d["config"].__setitem__("patching_threshold", "high")), ("config.json", "patching_threshold", "finite number", "'high'")),
    ("native", _json("config.json", lambda d: d["config"].__setitem__("patching_threshold", float("nan"))), ("config.json", "patching_threshold", "finite number")),
    ("native", _json("config.json", lambda d: d["config"].__setitem__("patching_mode", "space")), ("config.json", "patching_mode", "'entropy'", "'static'", "'space'")),
    ("native", _json("config.json", lambda d: d["config"]["encoder"].__setitem__("n_layers", True)), ("config.json", "encoder", "n_layers", "integer", "True")),
    ("native", _json("config.json", lambda d: d["config"]["global_"].__setitem__("dim", 48.0)), ("config.json", "global_", "dim", "integer")),
    ("native", _json("config.json", lambda d: d["config"]["decoder"].__setitem__("rope_theta", -1.0)), ("config.json", "decoder", "rope_theta", "> 0")),
    ("native", _json("config.json", lambda d: d["config"]["decoder"].__setitem__("norm_eps", "1e-5")), ("config.json", "norm_eps", "finite number")),
    ("native", _json("config.json", lambda d: d["config"]["encoder"].__setitem__("sliding_window", "16")), ("config.json", "sliding_window", "integer", "null")),
    ("native", _json("config.json", lambda d: d["config"].__setitem__("encoder_hash_byte_group_size", "34")), ("config.json", "encoder_hash_byte_group_size", "list of integers")),
    ("native", _json("config.json", lambda d: d["config"].__setitem__("encoder_hash_byte_group_size", None)), ("config.json", "encoder_hash_byte_group_size", "list of integers")),
    ("native", _json("config.json", lambda d: d["config"].__setitem__("encoder_hash_byte_group_size", [3, 0])), ("config.json", "encoder_hash_byte_group_size", "in 1..64")),
    ("native", _json("config.json", lambda d: d["config"].__setitem__("cross_attn_all_layers_decoder", "yes")), ("config.json", "cross_attn_all_layers_decoder", "true or false")),
    ("native", _json("config.json", lambda d: d["config"].__setitem__("max_patch_length", 2.5)), ("config.json", "max_patch_length", "integer")),
    ("native", _json("config.json", lambda d: d["config"]["encoder"].pop("dim")), ("config.json", "encoder", "missing", "dim")),
    ("native", _json("config.json", lambda d: d["config"].pop("decoder")), ("config.json", "missing", "decoder")),
    ("native", _json("config.json", lambda d: d.__setitem__("config", [1])), ("config.json", "'config'", "object")),
    ("native", _raw("config.json", NOT_UTF8), ("config.json", "UTF-8")),
    ("native", _raw("config.json", b'{"format": "blt-decode", "version": ' + b"9" * 5000 + b"}"), ("config.json", "JSON")),
    ("native", _raw("config.json", b"[" * 100_000 + b"]" * 100_000), ("config.json", "JSON")),
    ("native", _tensor("model.safetensors", "local_decoder.norm.weight", torch.ones(32, dtype=torch.int64)), ("model.safetensors", "'local_decoder.norm.weight'", "int64", "floating")),
    ("native", _tensor("model.safetensors", "local_decoder.norm.weight", torch.ones(32).to(torch.float8_e4m3fn)), ("model.safetensors", "'local_decoder.norm.weight'", "float8")),
    # Hugging Face: config.json and the shard index
    ("hf", _raw("config.json", NOT_UTF8), ("config.json", "UTF-8")),
    ("hf", _json("config.json", lambda d: d["global_config"].__setitem__("rope_parameters", [1])), ("config.json", "'global_config.rope_parameters'", "object")),
    ("hf", _json("config.json", lambda d: d.__setitem__("encoder_hash_byte_group_vocab", 2**62)), ("config.json", "encoder_hash_byte_group_vocab must be an integer in 1..16777216")),
    ("hf", _json("config.json", lambda d: d["global_config"].__setitem__("rms_norm_eps", 10**400)), ("config.json", "'global_config.rms_norm_eps'", "finite number")),
    ("hf", _sharded(_dotdot_outside), ("model.safetensors.index.json", "'../other/model.safetensors'", "outside the checkpoint directory")),
    ("hf", _sharded(lambda p: str(_outside(p).resolve())), ("model.safetensors.index.json", "other/model.safetensors'", "outside the checkpoint directory")),
    ("hf", _sharded(_symlink_outside), ("model.safetensors.index.json", "'link.safetensors'", "outside the checkpoint directory")),
    ("hf", _sharded(lambda p: 5), ("model.safetensors.index.json", "weight_map", "5", "file name")),
    ("hf", _sharded(lambda p: ["a"]), ("model.safetensors.index.json", "weight_map", "file name")),
    # original, as released
    ("original", _raw("entropy_model/params.json", NOT_UTF8), ("params.json", "UTF-8")),
    ("original", _json("config.json", lambda d: d["args"].__setitem__("ffn_dim_multiplier", 1e308)), ("config.json", "ffn_dim_multiplier")),
    ("original", _json("config.json", lambda d: d["args"].__setitem__("dim_global", 2**70)), ("config.json", "dim must be an integer in 1..65536")),
    ("original", _json("config.json", lambda d: d["args"].__setitem__("encoder_hash_byte_group_size", [3, 0])), ("config.json", "encoder_hash_byte_group_size", "in 1..64")),
    ("original", _json("entropy_model/params.json", lambda d: d["data"].__setitem__("patcher_args", [1])), ("params.json", "'data.patcher_args'", "object")),
    ("original", _json("entropy_model/params.json", lambda d: d.__setitem__("data", "x")), ("params.json", "'data'", "object")),
    # original training checkpoint
    ("original-train", _raw("params.json", NOT_UTF8), ("params.json", "UTF-8")),
    ("original-train", _raw("consolidated.pth", b"this is not a torch file"), ("consolidated.pth", "corrupt")),
    ("original-train", _tensor("consolidated.pth", 3, torch.zeros(1)), ("consolidated.pth", "tensor names must be strings", "3")),
    ("original-train", _tensor("consolidated.pth", "local_decoder.norm.weight", torch.ones(32, dtype=torch.complex64)), ("consolidated.pth", "'local_decoder.norm.weight'", "complex64")),
]


@pytest.mark.parametrize("fmt,corrupt,needles", CORRUPT, ids=[f"{c[0]}-{i}" for i, c in enumerate(CORRUPT)])
def test_corrupt_checkpoint_fails_with_one_typed_line(fmt, corrupt, needles, saved):
    path = saved(fmt)
    corrupt(path)
    with pytest.raises(BLTDecodeError) as err:
        formats.load_checkpoint(path)
    assert isinstance(err.value, (CheckpointError, ConfigError)), repr(err.value)
    message = str(err.value)
    assert "\n" not in message and "Attribute(" not in message, message
    assert message.count(str(path)) == 1, message  # the file is named once, not once per wrapping layer
    for needle in needles:
        assert needle in message, (needle, message)


def test_native_readers_refuse_non_utf8_config(saved):
    """The native readers used outside detection (the shipped default model) fail the same way."""
    path = saved("native")
    (path / "config.json").write_bytes(NOT_UTF8)
    with pytest.raises(CheckpointError, match=r"config\.json is not UTF-8"):
        native.load_native(path)
    assert native.is_native_checkpoint(path) is False  # a predicate: unreadable means "not native"


def test_shards_inside_the_checkpoint_directory_still_load(saved, model):
    """Subdirectories and symlinks that stay inside the directory are fine; so is the Hugging Face hub
    cache, whose snapshot files are symlinks to ../../blobs/<hash>."""
    path = saved("hf")
    _sharded(lambda p: "sub/../shard.safetensors")(path)
    (path / "sub").mkdir()
    assert tensors_equal(formats.load_checkpoint(path), model)

    repo = path.parent / "models--facebook--blt-tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    (snapshot / "sub").mkdir(parents=True)
    for file in path.iterdir():
        if file.is_file():
            blob = repo / "blobs" / f"blob-{file.name}"
            shutil.copy(file, blob)
            (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    assert tensors_equal(formats.load_checkpoint(snapshot), model)


@pytest.mark.parametrize("cls,field,value,needles", [
    (TransformerConfig, "dim", "32", ("dim", "integer", "'32'")),
    (TransformerConfig, "n_layers", False, ("n_layers", "integer", "False")),
    (TransformerConfig, "n_layers", -1, ("n_layers", "in 0..1024", "-1")),
    (TransformerConfig, "n_kv_heads", 1.0, ("n_kv_heads", "integer", "None")),
    (TransformerConfig, "rope_theta", float("inf"), ("rope_theta", "finite number")),
    (TransformerConfig, "norm_eps", 0.0, ("norm_eps", "> 0")),
    (BLTConfig, "encoder", None, ("encoder", "TransformerConfig")),
    (BLTConfig, "entropy_model", {"dim": 32}, ("entropy_model", "TransformerConfig", "None")),
    (BLTConfig, "vocab_size", "260", ("vocab_size", "integer")),
    (BLTConfig, "cross_attn_k", True, ("cross_attn_k", "integer")),
    (BLTConfig, "cross_attn_all_layers_decoder", 1, ("cross_attn_all_layers_decoder", "True or False")),
    (BLTConfig, "encoder_hash_byte_group_size", (3, "4"), ("encoder_hash_byte_group_size", "integers")),
    (BLTConfig, "encoder_hash_byte_group_size", "345", ("encoder_hash_byte_group_size", "integers")),
    (BLTConfig, "patching_mode", "bpe", ("patching_mode", "'entropy'", "'static'")),
    (BLTConfig, "patching_threshold", "high", ("patching_threshold", "finite number")),
    (BLTConfig, "max_seqlen", 0, ("max_seqlen", "in 1..1048576")),
])
def test_config_fields_are_type_checked_at_construction(cls, field, value, needles):
    base = CONFIG if cls is BLTConfig else CONFIG.encoder
    with pytest.raises(ConfigError) as err:
        attrs.evolve(base, **{field: value})
    message = str(err.value)
    assert "\n" not in message and "Attribute(" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_config_numbers_are_normalised():
    """Integers are accepted where a float is expected (JSON writes 10000 for 10000.0) and stored as float;
    numpy integers become ints, so the config still writes as JSON."""
    stack = TransformerConfig(dim=np.int64(32), n_layers=1, n_heads=2, ffn_dim=96, rope_theta=10000)
    assert type(stack.dim) is int and type(stack.rope_theta) is float and stack.rope_theta == 10000.0
    config = attrs.evolve(CONFIG, encoder_hash_byte_group_size=[3, 4], patching_threshold=2)
    assert config.encoder_hash_byte_group_size == (3, 4) and type(config.patching_threshold) is float
    assert BLTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# -- writing what a format cannot express -----------------------------------------------------------------
@pytest.mark.parametrize("fmt,change,needle", [
    ("hf", dict(patching_mode="static", max_patch_length=4, entropy_model=None), "entropy patching only"),
    ("original", dict(patching_mode="static", max_patch_length=4, entropy_model=None), "static patching"),
    ("hf", dict(decoder=stack(32, 2, 2, 96, 32)), "one local attention window"),
    ("hf", dict(cross_attn_nheads=1), "cross-attention"),
    ("original", dict(entropy_model=stack(32, 1, 2, 96, 64)), "fixes sliding_window=512"),
    ("original", dict(decoder=stack(32, 2, 2, 96, 16, rope_theta=10000.0)), "one rope_theta"),
    ("original", dict(global_=stack(48, 2, 4, 100, None, rope_theta=500000.0)), "no single multiple_of"),
])
def test_writing_an_inexpressible_model_fails_before_writing(fmt, change, needle, tmp_path):
    model = make_model(attrs.evolve(CONFIG, **change))
    with pytest.raises(ConfigError, match=needle):
        formats.save_checkpoint(model, tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


def test_original_ffn_formula_and_multiple_of():
    assert original.ffn_dim(1024, 256, None) == 2816  # BLT-1B local models
    assert original.ffn_dim(2048, 256, None) == 5632  # BLT-1B global model
    assert original.ffn_dim(768, 256, None) == 2048  # released entropy model
    assert original._multiple_of({"a": (1024, 2816), "b": (2048, 5632)}) == 256
    assert original._multiple_of({"a": (32, 96), "b": (48, 128)}) == 32


# -- the command line ---------------------------------------------------------------------------------
def test_cli_convert_all_directions(saved, tmp_path, model, capsys):
    src = saved("native")
    chain = [("native", "hf"), ("hf", "original"), ("original", "native"), ("native", "original"), ("original", "hf"), ("hf", "native")]
    paths = {"native": src}
    for i, (frm, to) in enumerate(chain):
        dst = tmp_path / f"step{i}-{to}"
        assert cli.main(["convert", str(paths[frm]), str(dst), "--to", to]) == 0
        assert formats.detect_format(dst) == to
        assert tensors_equal(formats.load_checkpoint(dst), model)
        paths[to] = dst
    assert "->" in capsys.readouterr().out


def test_cli_convert_refuses_to_overwrite_and_reports_errors(saved, tmp_path, capsys):
    src = saved("native")
    dst = tmp_path / "occupied"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    assert cli.main(["convert", str(src), str(dst), "--to", "hf"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["convert", str(src), str(dst), "--to", "hf", "--overwrite"]) == 0
    assert cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--to", "hf"]) == 2
    assert "blt-decode: error:" in capsys.readouterr().err


def test_cli_convert_dtype(saved, tmp_path):
    assert cli.main(["convert", str(saved("native")), str(tmp_path / "bf16"), "--to", "hf", "--dtype", "bfloat16"]) == 0
    tensors = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_cli_convert_native_to_native_keeps_the_training_metadata(model, tmp_path, capsys):
    from blt_decode.checkpoints.native import save_model, source_digest

    save_model(model, tmp_path / "src", metadata={"training": {"kind": "blt", "steps": 7}, "corpus": "c-v1"})
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "bf16"), "--to", "native", "--dtype", "bfloat16"]) == 0
    meta = json.loads((tmp_path / "bf16" / "config.json").read_text())["metadata"]
    assert meta["training"] == {"kind": "blt", "steps": 7} and meta["corpus"] == "c-v1"
    # the source by name and content, not by its local path (tmp_path is absolute: its last component)
    assert meta["converted"] == {"from": "src", "source_sha256": source_digest(tmp_path / "src"), "dtype": "bfloat16"}
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()} == {torch.bfloat16}
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "metadata is not carried" in capsys.readouterr().out


# -- how Hugging Face config fields are resolved (docs/checkpoints.md §5) ------------------------------
def _hf_config_dict(model: BLTModel) -> dict:
    return hf.config_to_hf(model.config, torch.float32)


def test_hf_rotary_base_precedence_and_defaults(model):
    data = _hf_config_dict(model)
    data["encoder_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 123.0}
    data["encoder_config"]["rope_theta"] = 456.0  # legacy key loses to rope_parameters, as in transformers
    data["decoder_config"].pop("rope_parameters")  # legacy key alone
    data["decoder_config"]["rope_theta"] = 789.0
    for key in ("global_config", "patcher_config"):  # neither: the class defaults
        data[key].pop("rope_parameters"), data[key].pop("rope_theta")
    data["rope_parameters"] = {"rope_type": "default", "rope_theta": 1.0}  # top level reaches no stack
    config = hf.config_from_hf(data, "config.json")
    assert (config.encoder.rope_theta, config.decoder.rope_theta) == (123.0, 789.0)
    assert config.global_.rope_theta == hf.DEFAULT_THETA == 500000.0
    assert config.entropy_model.rope_theta == hf.DEFAULT_PATCHER_THETA == 10000.0


def test_hf_norm_eps_from_conversion_script_key(model):
    data = _hf_config_dict(model)
    data["encoder_config"].pop("rms_norm_eps")
    data["encoder_config"]["norm_eps"] = 1e-6  # what convert_blt_weights_to_hf.py writes
    data["decoder_config"].pop("rms_norm_eps")  # neither key: transformers' default
    config = hf.config_from_hf(data, "config.json")
    assert config.encoder.norm_eps == 1e-6 and config.decoder.norm_eps == 1e-5


def test_hf_windows_when_absent_are_the_released_512(model):
    data = _hf_config_dict(model)
    data.pop("local_attention_window_len"), data["patcher_config"].pop("sliding_window")
    data["encoder_config"]["sliding_window"] = 3  # transformers overwrites it with the top-level field
    config = hf.config_from_hf(data, "config.json")
    assert config.encoder.sliding_window == config.decoder.sliding_window == 512
    assert config.entropy_model.sliding_window == 512 and config.global_.sliding_window is None
    data["local_attention_window_len"] = None
    assert hf.config_from_hf(data, "config.json").decoder.sliding_window is None
