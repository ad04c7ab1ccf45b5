"""LoRAs both ways: PEFT folders (SimpleTuner's naming) in and out, and LoRAs merged into a full checkpoint."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import train
from hmtiny.checkpoint import iter_tensors, load_heartmula
from hmtiny.export import main as export_main
from hmtiny.export import merge_into
from hmtiny.lora import inject_lora, load_lora_into, lora_parameters, read_lora, save_lora
from hmtiny.quant import Int8Linear, quantize_model
from hmtiny.tiny import ASSETS
from hmtiny.train_config import load_config
from hmtiny.trainer import read_model_config
from test_train import make_run


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def inputs(model, S=10):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (2, S, 9), generator=g)
    mask = torch.zeros(2, S, 9, dtype=torch.bool)
    mask[:, :4, 8] = True
    mask[:, 4:, :8] = True
    return tokens, mask, torch.tensor([1, 1])


def logits(model):
    with torch.no_grad():
        return model(*inputs(model))


def keys_of(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def trained_lora(folder, tmp_path, rank=4, alpha=8.0, targets=None):
    """The base at `folder` with a random LoRA, and that LoRA saved as our file."""
    model = load_heartmula(folder)
    inject_lora(model, rank=rank, alpha=alpha, targets=targets)
    randomize_lora(model)
    return model, save_lora(model, tmp_path / "ours" / "pytorch_lora_weights.safetensors")


# ---------------------------------------------------------------- PEFT folders
def test_ours_to_peft_to_ours_is_exact(fixtures, tmp_path):
    _, ours = trained_lora(fixtures / "heartmula", tmp_path, rank=4, alpha=8)
    assert export_main(["--lora", str(ours), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    keys = keys_of(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.model.backbone.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.decoder.layers.1.mlp.gate_proj.lora_B.weight" in keys
    assert "base_model.model.backbone.layers.2.self_attn.o_proj.lora_A.weight" in keys
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_dora"]) == ("LORA", 4, 8.0, False)
    a, b = read_lora(ours), read_lora(tmp_path / "peft")
    assert a.modules.keys() == b.modules.keys() and (b.rank, b.alpha) == (4, 8.0)
    for name, (a_a, a_b, a_s) in a.modules.items():
        b_a, b_b, b_s = b.modules[name]
        assert torch.equal(a_a, b_a) and torch.equal(a_b, b_b) and a_s == b_s == 2.0
    # SimpleTuner's init_lora file: the same tensors under its 'transformer.' prefix
    init = read_lora(tmp_path / "peft" / "simpletuner_init_lora.safetensors")
    assert all(k.startswith("transformer.base_model.model.")
               for k in keys_of(tmp_path / "peft" / "simpletuner_init_lora.safetensors"))
    assert all(torch.equal(init.modules[n][1], b.modules[n][1]) for n in b.modules)


def handwritten_peft(folder, config, extra=None):
    """A PEFT adapter as SimpleTuner's save_pretrained writes it, built by hand: rank 4 on q_proj and gate_proj."""
    g = torch.Generator().manual_seed(3)
    shapes = {"backbone.layers.{}.self_attn.q_proj": (12, 12), "backbone.layers.{}.mlp.gate_proj": (40, 12)}
    tensors = {}
    for i in range(3):
        for pattern, (out, inp) in shapes.items():
            key = "base_model.model." + pattern.format(i)
            tensors[key + ".lora_A.weight"] = torch.randn(4, inp, generator=g)
            tensors[key + ".lora_B.weight"] = torch.randn(out, 4, generator=g)
    tensors.update(extra or {})
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def test_simpletuner_peft_folder_loads_with_alpha_over_rank(fixtures, tmp_path):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "gate_proj"],
              "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none"}
    tensors = handwritten_peft(tmp_path / "st", config)
    lw = read_lora(tmp_path / "st")
    assert lw.targets == ["q_proj", "w1"] and lw.alpha == 8.0
    assert set(lw.modules) == {f"backbone.layers.{i}.{leaf}" for i in range(3) for leaf in ("attn.q_proj", "mlp.w1")}
    assert all(s == 2.0 for _, _, s in lw.modules.values())  # alpha 8 / rank 4, not 1.0
    # applied: every layer moves by exactly 2 * B @ A
    base = load_heartmula(fixtures / "heartmula")
    model = load_heartmula(fixtures / "heartmula")
    targets = [f"backbone.layers.{i}.{leaf}" for i in range(3) for leaf in ("self_attn.q_proj", "mlp.gate_proj")]
    inject_lora(model, rank=4, alpha=4, targets=targets)  # a run with another alpha: folded into B
    load_lora_into(model, tmp_path / "st")
    layer = model.backbone.layers[1].mlp.w1
    a = tensors["base_model.model.backbone.layers.1.mlp.gate_proj.lora_A.weight"]
    b = tensors["base_model.model.backbone.layers.1.mlp.gate_proj.lora_B.weight"]
    x = torch.randn(5, 12)
    want = x @ (base.backbone.layers[1].mlp.w1.weight + 2.0 * b @ a).T
    assert torch.allclose(layer(x), want, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA"),
    ({"rank_pattern": {"backbone.layers.0.self_attn.q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 2}}, "alpha_pattern"),
    ({"peft_type": "LOHA"}, "LyCORIS"),
    ({"r": 8}, "rank 4 but adapter_config.json says r = 8"),
])
def test_peft_adapters_we_cannot_apply_exactly_are_refused(tmp_path, change, message):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, **change}
    handwritten_peft(tmp_path / "x", config)
    with pytest.raises(ValueError, match=message) as e:
        read_lora(tmp_path / "x")
    assert "adapter_" in str(e.value)  # names the file


def test_dora_and_lycoris_tensors_are_refused_by_name(tmp_path):
    extra = {"base_model.model.backbone.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(12)}
    handwritten_peft(tmp_path / "d", {"r": 4, "lora_alpha": 4}, extra)
    with pytest.raises(ValueError, match="DoRA"):
        read_lora(tmp_path / "d")
    save_file({"lycoris_backbone_layers_0_attn_q_proj.hada_w1_a": torch.ones(2, 2)}, str(tmp_path / "l.safetensors"))
    with pytest.raises(ValueError, match="LyCORIS"):
        read_lora(tmp_path / "l.safetensors")


def test_sample_takes_a_peft_folder(tmp_path):
    import sample
    handwritten_peft(tmp_path / "st", {"r": 4, "lora_alpha": 4})
    path, scale = sample.parse_lora(f"{tmp_path / 'st'}:0.5")
    assert (Path(path.path).name, scale) == ("adapter_model.safetensors", 0.5)  # read and checked already
    with pytest.raises(sample.UsageError, match="neither adapter_model.safetensors"):
        sample.parse_lora(str(tmp_path))


# ---------------------------------------------------------------- merged checkpoints
def test_merged_checkpoint_gives_base_plus_lora_logits(fixtures, tmp_path):
    """fp32 fixture: the merged weights differ from base + unmerged adapters by float rounding only (atol 2e-5)."""
    model, ours = trained_lora(fixtures / "heartmula", tmp_path, rank=4, alpha=8)
    second = tmp_path / "second.safetensors"
    randomize_lora(model, seed=7)
    save_lora(model, second)
    randomize_lora(model, seed=1)  # back to `ours`: check the sum of ours + 0.5 * second below
    assert export_main(["--model", str(fixtures / "heartmula"), "--lora", str(ours), "--lora", f"{second}:0.5",
                        "--merge", "--out", str(tmp_path / "merged")]) == 0
    merged = load_heartmula(tmp_path / "merged")
    unmerged = load_heartmula(fixtures / "heartmula")
    from hmtiny.lora import apply_loras
    apply_loras(unmerged, [(ours, 1.0), (second, 0.5)], merge=False)
    for got, want in zip(logits(merged), logits(unmerged)):
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(logits(merged)[1], logits(load_heartmula(fixtures / "heartmula"))[1], atol=1e-3)
    # the official key layout, shapes and dtype
    official = {k: (tuple(t.shape), t.dtype) for k, t in iter_tensors(fixtures / "heartmula")}
    written = {k: (tuple(t.shape), t.dtype) for k, t in iter_tensors(tmp_path / "merged")}
    assert written == official
    assert (tmp_path / "merged" / "config.json").read_text() == (fixtures / "heartmula" / "config.json").read_text()


def test_merge_keeps_a_bf16_base_and_writes_heartlib_ckpt_layout(tmp_path):
    model_dir = ASSETS / "model"
    _, ours = trained_lora(model_dir, tmp_path, rank=2, alpha=2)
    out = tmp_path / "ckpt"
    assert export_main(["--model", str(model_dir), "--lora", str(ours), "--merge", "--out", str(out),
                        "--ckpt-layout"]) == 0
    assert {p.name for p in out.iterdir()} == {"HeartMuLa-oss-3B", "HeartCodec-oss", "tokenizer.json",
                                               "gen_config.json"}
    assert (out / "HeartCodec-oss" / "config.json").is_file()
    assert all(t.dtype == torch.bfloat16 for _, t in iter_tensors(out / "HeartMuLa-oss-3B"))
    merged = load_heartmula(out)  # heartlib's ckpt/ folder: the model is found in HeartMuLa-oss-3B/
    base = load_heartmula(model_dir)
    assert not torch.equal(merged.backbone.layers[0].attn.q_proj.weight, base.backbone.layers[0].attn.q_proj.weight)


def test_int8_model_is_dequantised_before_merging(fixtures, tmp_path):
    _, ours = trained_lora(fixtures / "heartmula", tmp_path)
    model = quantize_model(load_heartmula(fixtures / "heartmula"))
    merge_into(model, [(ours, 1.0)])
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert model.backbone.layers[0].attn.q_proj.weight.dtype == torch.bfloat16


def test_export_refuses_a_used_output_folder_and_mixed_modes(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    assert export_main(["--lora", "a", "--format", "peft", "--out", str(tmp_path / "used")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert export_main(["--lora", "a", "--format", "peft", "--merge", "--out", str(tmp_path / "o")]) == 2
    assert "choose one of" in capsys.readouterr().err
    assert export_main(["--lora", "a", "--merge", "--out", str(tmp_path / "o")]) == 2
    assert "--merge needs --model" in capsys.readouterr().err


def test_init_lora_takes_a_peft_folder(tmp_path):
    """train.py's init_lora: a PEFT folder (alpha 8, rank 4) into a run with alpha 4 is checked before the model
    loads and starts from exactly the folder's update (scale folded into B)."""
    _, ours = trained_lora(ASSETS / "model", tmp_path, rank=4, alpha=8)
    assert export_main(["--lora", str(ours), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    cfg = load_config(make_run(tmp_path / "run", init_lora=str(tmp_path / "peft"), lora_alpha=4))
    train.check_lora_plan(cfg, read_model_config(cfg))  # raises on any mismatch
    model = load_heartmula(ASSETS / "model")
    inject_lora(model, rank=4, alpha=4)
    load_lora_into(model, cfg.init_lora)
    layer, (a, b, scale) = model.decoder.layers[0].mlp.w2, read_lora(ours).modules["decoder.layers.0.mlp.w2"]
    assert scale == 2.0 and torch.equal(layer.lora_A.weight, a)
    assert torch.allclose(layer.lora_B.weight * layer.scaling, b * scale)
