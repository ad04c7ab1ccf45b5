"""Checkpoint loading/saving: shards, key and shape errors, round trips, config reading."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hmtiny.checkpoint import load_heartmula, save_heartmula, save_weights, weight_files
from hmtiny.config import FLAVOURS, ModelConfig


@pytest.fixture
def mula_dir(fixtures, tmp_path):
    d = tmp_path / "HeartMuLa-oss-3B"
    d.mkdir()
    shutil.copy(fixtures / "heartmula" / "config.json", d / "config.json")
    shutil.copy(fixtures / "heartmula" / "model.safetensors", d / "model.safetensors")
    return d


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sharded_checkpoint_loads_identically(mula_dir, tmp_path):
    """The fixture split by hand into 2 shards + index, as Hugging Face writes them."""
    ref = load_heartmula(mula_dir)
    state = load_file(str(mula_dir / "model.safetensors"))
    keys = sorted(state)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(sharded / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(mula_dir / "config.json", sharded / "config.json")
    assert len(weight_files(sharded)) == 2
    assert state_equal(load_heartmula(sharded), ref)


def test_save_weights_shards_round_trip(mula_dir, tmp_path):
    ref = load_heartmula(mula_dir)
    state = load_file(str(mula_dir / "model.safetensors"))
    out = tmp_path / "resharded"
    save_weights(state, out, max_shard_bytes=sum(v.numel() * 4 for v in state.values()) // 3)
    shutil.copy(mula_dir / "config.json", out / "config.json")
    assert len(weight_files(out)) > 1 and not (out / "model.safetensors").exists()
    assert state_equal(load_heartmula(out), ref)


def test_heartlib_ckpt_layout(mula_dir):
    """ckpt/HeartMuLa-oss-3B/ as the official repo lays it out: pass the ckpt folder."""
    assert state_equal(load_heartmula(mula_dir.parent), load_heartmula(mula_dir))


def _rewrite(folder, edit):
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def test_missing_key_is_named(mula_dir):
    _rewrite(mula_dir, lambda s: s.pop("decoder.layers.1.mlp.w3.weight"))
    with pytest.raises(ValueError, match=r"missing keys.*decoder\.layers\.1\.mlp\.w3\.weight"):
        load_heartmula(mula_dir)


def test_unexpected_key_is_named(mula_dir):
    _rewrite(mula_dir, lambda s: s.__setitem__("backbone.tok_embeddings.weight", torch.zeros(3, 12)))
    with pytest.raises(ValueError, match=r"unexpected keys.*backbone\.tok_embeddings\.weight"):
        load_heartmula(mula_dir)


def test_wrong_shape_is_named(mula_dir):
    _rewrite(mula_dir, lambda s: s.__setitem__("projection.weight", torch.zeros(12, 11)))
    with pytest.raises(ValueError, match=r"shape mismatches.*projection\.weight.*\(12, 11\)"):
        load_heartmula(mula_dir)


def test_save_load_round_trip_exact(mula_dir, tmp_path):
    model = load_heartmula(mula_dir)
    with torch.no_grad():  # make sure we are not just re-reading the fixture
        model.audio_head.mul_(1.5)
    out = tmp_path / "saved"
    save_heartmula(model, out)
    again = load_heartmula(out)
    assert state_equal(model, again)
    assert again.cfg == model.cfg


def test_dtype_on_load(mula_dir):
    model = load_heartmula(mula_dir, dtype=torch.bfloat16)
    assert model.backbone.layers[0].attn.q_proj.weight.dtype == torch.bfloat16
    assert model.audio_head.dtype == torch.bfloat16
    assert model.backbone.rope.dtype == torch.float32  # computed tables stay float32


def test_missing_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_heartmula(tmp_path / "nope")


def test_config_ignores_metadata_and_requires_fields(fixtures):
    d = json.loads((fixtures / "heartmula" / "config.json").read_text())
    cfg = ModelConfig.from_dict(d)  # carries architectures, torch_dtype, notes... : ignored
    assert cfg.backbone.num_layers == d["backbone"]["num_layers"]
    del d["muq_dim"]
    with pytest.raises(ValueError, match="muq_dim"):
        ModelConfig.from_dict(d)


def test_official_flavours():
    cfg = ModelConfig.official_3b()
    assert (cfg.backbone.num_layers, cfg.backbone.embed_dim, cfg.backbone.head_dim) == (28, 3072, 128)
    assert (cfg.decoder.num_layers, cfg.decoder.num_heads, cfg.decoder.head_dim) == (3, 8, 384)
    assert cfg.decoder.old_context_len == 8192 and cfg.decoder.max_seq_len == 2048
    assert FLAVOURS["llama-7B"].intermediate_dim == 14336 and FLAVOURS["llama-400M"].num_layers == 4
    assert cfg.codebook_size == 8192 and cfg.gen.audio_eos_id == 8193
    with pytest.raises(ValueError, match="unknown backbone_flavor"):
        ModelConfig.from_dict({**cfg.to_dict(), "backbone_flavor": "llama-1B"})


def test_3b_parameter_count_on_meta():
    with torch.device("meta"):
        from hmtiny.model import HeartMuLa
        model = HeartMuLa(ModelConfig.official_3b())
    n = sum(p.numel() for p in model.parameters())
    # Llama-3.2-3B blocks (~2.8B) + 300M decoder + embeddings/heads, no dead token tables
    assert 3.5e9 < n < 4.1e9, n
