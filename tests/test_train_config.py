"""TrainConfig: SimpleTuner keys, aliases, ignored options, typos, types, impossible values, paths."""
import json
from pathlib import Path

import pytest

from hmtiny.train_config import (BUILTIN_CONFIG, ConfigError, TrainConfig, coerce, load_config, parse_cli)


@pytest.fixture
def cfg_dir(tmp_path):
    (tmp_path / "multidatabackend.json").write_text("[]")
    return tmp_path


def write(folder: Path, **keys) -> Path:
    base = {"model_family": "heartmula", "model_type": "lora",
            "data_backend_config": str(folder / "multidatabackend.json"), "max_train_steps": 10}
    base.update(keys)
    path = folder / "config.json"
    path.write_text(json.dumps(base))
    return path


def load(folder, overrides=None, **keys):
    warnings = []
    cfg = load_config(write(folder, **keys), overrides, warn=warnings.append)
    return cfg, warnings


def test_defaults_follow_simpletuner(cfg_dir):
    cfg, warnings = load(cfg_dir)
    assert warnings == []
    assert (cfg.lora_rank, cfg.alpha, cfg.lora_dropout, cfg.max_grad_norm) == (16, 16.0, 0.1, 2.0)
    assert cfg.lr_scheduler == "constant_with_warmup" and cfg.resume_from_checkpoint == "latest"
    assert cfg.validation_audio_duration == 30.0 and cfg.num_validation_images == 1


def test_simpletuner_example_config_runs_unchanged(cfg_dir):
    """bghira/SimpleTuner simpletuner/examples/heartmula.peft-lora/config.json (keys and values)."""
    example = {
        "mixed_precision": "bf16", "checkpoint_step_interval": 50, "compress_disk_cache": True,
        "data_backend_config": str(cfg_dir / "multidatabackend.json"),
        "hub_model_id": "simpletuner-example-heartmula-peft-lora", "learning_rate": 0.00005, "lora_rank": 128,
        "lr_scheduler": "cosine", "lr_warmup_steps": 50, "max_grad_norm": 1.0, "max_train_steps": 200,
        "model_family": "heartmula", "model_flavour": "3b", "model_type": "lora", "num_train_epochs": 0,
        "optimizer": "adamw_bf16", "output_dir": "output/examples/heartmula.peft-lora", "report_to": "none",
        "seed": 42, "tracker_project_name": "lora-training", "tracker_run_name": "example-training-run",
        "train_batch_size": 1, "vae_batch_size": 1, "vae_enable_tiling": True, "vae_enable_slicing": True,
        "vae_cache_disable": True, "validation_disable_unconditional": True, "validation_guidance": 3,
        "validation_lyrics": "I'm a little tea-pot", "validation_prompt": "bright synth pop",
        "validation_steps": 50, "validation_num_inference_steps": 80, "validation_seed": 42}
    path = cfg_dir / "example.json"
    path.write_text(json.dumps(example))
    warnings = []
    cfg = load_config(path, warn=warnings.append)
    # aliases land on our names
    assert cfg.checkpointing_steps == 50 and cfg.validation_step_interval == 50
    assert cfg.lora_rank == 128 and cfg.lr_scheduler == "cosine" and cfg.validation_guidance == 3.0
    # one warning lists every ignored option
    assert len(warnings) == 1
    assert (cfg.report_to, cfg.tracker_project_name, cfg.tracker_run_name) == ("none", "lora-training",
                                                                             "example-training-run")
    for key in ("compress_disk_cache", "hub_model_id",
                "vae_batch_size", "vae_enable_tiling", "vae_enable_slicing", "vae_cache_disable",
                "validation_disable_unconditional", "validation_num_inference_steps"):
        assert key in warnings[0]


def test_quickstart_config_loads(cfg_dir):
    cfg, warnings = load(cfg_dir, model_flavour="3b", pretrained_model_name_or_path="HeartMuLa/HeartMuLa-oss-3B",
                         resolution=0, mixed_precision="bf16", base_model_precision="int8-quanto")
    assert cfg.int8_base and cfg.pretrained_model_name_or_path == "HeartMuLa/HeartMuLa-oss-3B"
    assert warnings == []


def test_typo_is_an_error_with_a_suggestion(cfg_dir):
    with pytest.raises(ConfigError, match=r"'lora_rnak'.*did you mean 'lora_rank'"):
        load(cfg_dir, lora_rnak=4)
    with pytest.raises(ConfigError, match=r"'learning_rte'.*command line.*'learning_rate'"):
        load(cfg_dir, {"learning_rte": "1e-4"})


def test_dash_prefixed_keys_and_null_default(cfg_dir):
    cfg, _ = load(cfg_dir, **{"--lora_rank": 8, "--seed": None})
    assert cfg.lora_rank == 8 and cfg.seed is None


def test_alias_and_name_together_in_one_file_is_an_error(cfg_dir):
    with pytest.raises(ConfigError, match="checkpoint_step_interval"):
        load(cfg_dir, checkpointing_steps=5, checkpoint_step_interval=10)


def test_command_line_overrides_and_coercion(cfg_dir):
    path = write(cfg_dir, lora_rank=4)
    _, overrides = parse_cli([str(path), "--lora_rank=32", "--learning_rate=3e-4", "--gradient_checkpointing=false",
                              "--lora_target_modules=q_proj,v_proj", "--validation_seed", "7", "--validation_disable"])
    cfg = load_config(path, overrides)
    assert cfg.lora_rank == 32 and cfg.learning_rate == 3e-4 and cfg.gradient_checkpointing is False
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.validation_seed == 7 and cfg.validation_disable


def test_env_shorthand():
    path, overrides = parse_cli(["env=heartmula-training-demo", "--seed=3"])
    assert Path(path) == Path("config/heartmula-training-demo/config.json") and overrides == {"seed": "3"}
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_cli(["a.json", "b.json"])


@pytest.mark.parametrize("key,value,match", [
    ("learning_rate", "abc", "learning_rate must be a number"),
    ("learning_rate", -1e-4, "learning_rate must be > 0"),
    ("lora_rank", 0, "lora_rank must be > 0"),
    ("lora_rank", 2.5, "lora_rank must be an integer"),
    ("lora_rank", True, "lora_rank must be an integer"),
    ("lora_dropout", 1.5, "lora_dropout must be in"),
    ("gradient_checkpointing", "maybe", "gradient_checkpointing must be true or false"),
    ("lr_scheduler", "sine", "lr_scheduler 'sine' is not supported"),
    ("model_family", "flux", "model_family 'flux' is not supported"),
    ("model_type", "dora", "model_type 'dora' is not supported"),
    ("model_flavour", "7b", "model_flavour"),
    ("mixed_precision", "fp8", "mixed_precision"),
    ("base_model_precision", "nf4-bnb", "base_model_precision"),
    ("optimizer", "prodigy", "optimizer 'prodigy'"),
    ("train_batch_size", 0, "train_batch_size must be > 0"),
    ("max_grad_norm", -1, "max_grad_norm must be >= 0"),
    ("checkpoints_total_limit", 0, "checkpoints_total_limit"),
    ("validation_audio_duration", 0, "validation_audio_duration"),
    ("validation_topk", -1, "validation_topk must be an integer >= 0"),
    ("validation_temperature", 0, "validation_temperature must be > 0"),
    ("lora_target_modules", 5, "lora_target_modules must be a list"),
    ("lora_type", "lycoris", "lora_type"),
])
def test_bad_values_name_the_key(cfg_dir, key, value, match):
    with pytest.raises(ConfigError, match=match):
        load(cfg_dir, **{key: value})


def test_validation_topk_zero_means_no_topk_as_in_sample_py(cfg_dir):
    assert load(cfg_dir, validation_topk=0)[0].validation_topk == 0


def test_int8_precision_names(cfg_dir):
    for name in ("int8-quanto", "int8", "int8-torchao"):
        assert load(cfg_dir, base_model_precision=name)[0].int8_base
    for name in ("no_change", "bf16"):
        assert not load(cfg_dir, base_model_precision=name)[0].int8_base
    with pytest.raises(ConfigError, match="base_model_precision"):
        load(cfg_dir, base_model_precision="fp8-quanto")


def test_epochs_zero_means_max_train_steps(cfg_dir):
    cfg, _ = load(cfg_dir, num_train_epochs=0, max_train_steps=7)
    assert cfg.max_train_steps == 7
    with pytest.raises(ConfigError, match="max_train_steps.*num_train_epochs"):
        load(cfg_dir, num_train_epochs=0, max_train_steps=0)


def test_image_only_options_get_a_clear_note(cfg_dir):
    cfg, warnings = load(cfg_dir, validation_resolution="1024x1024", validation_negative_prompt="blurry",
                         num_validation_images=3)
    assert cfg.num_validation_images == 3
    assert len(warnings) == 1 and "image-only" in warnings[0] and "validation_resolution" in warnings[0]


def test_missing_input_files_are_named(cfg_dir):
    with pytest.raises(ConfigError, match="data_backend_config: nope.json does not exist"):
        load(cfg_dir, data_backend_config="nope.json")
    with pytest.raises(ConfigError, match="init_lora: .*missing.safetensors does not exist"):
        load(cfg_dir, init_lora="missing.safetensors")
    with pytest.raises(ConfigError, match="data_backend_config is required"):
        load(cfg_dir, data_backend_config=None)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(cfg_dir / "absent.json")
    (cfg_dir / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json is not valid JSON"):
        load_config(cfg_dir / "broken.json")


def test_relative_paths_cwd_first_then_beside_config(tmp_path, monkeypatch):
    cfg_folder, cwd = tmp_path / "cfg", tmp_path / "cwd"
    cfg_folder.mkdir()
    cwd.mkdir()
    (cfg_folder / "mdb.json").write_text("[]")
    monkeypatch.chdir(cwd)
    path = cfg_folder / "config.json"
    path.write_text(json.dumps({"data_backend_config": "mdb.json", "max_train_steps": 1}))
    assert Path(load_config(path).data_backend_config) == cfg_folder / "mdb.json"  # only beside the config
    (cwd / "mdb.json").write_text("[]")
    assert Path(load_config(path).data_backend_config) == Path("mdb.json")  # the cwd wins, as in SimpleTuner


def test_builtin_default_resolves_beside_itself_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "multidatabackend.json").write_text("[]")  # a decoy in the cwd
    cfg = load_config(None)
    assert Path(cfg.data_backend_config) == BUILTIN_CONFIG.parent / "multidatabackend.json"
    assert Path(cfg.pretrained_model_name_or_path).is_dir()


def test_coerce_types():
    assert coerce("x", "true", bool) is True and coerce("x", 0, bool) is False
    assert coerce("x", "1e3", int) == 1000 and coerce("x", 4.0, int) == 4
    assert coerce("x", '["a", "b"]', list[str]) == ["a", "b"]
    assert coerce("x", "none", int | None) is None
    with pytest.raises(ConfigError, match="x must be a finite number"):
        coerce("x", "nan", float)


def test_to_dict_round_trip_keys():
    d = TrainConfig().to_dict()
    assert "config_path" not in d and d["lora_rank"] == 16


def test_full_fine_tuning_keys(cfg_dir):
    cfg, warnings = load(cfg_dir, model_type="full", lora_rank=8, lora_alpha=8)
    assert cfg.model_type == "full"
    assert warnings == ["model_type 'full' trains every weight, no LoRA: ignoring lora_alpha, lora_rank"]
    assert load(cfg_dir, model_type="full")[1] == []
    with pytest.raises(ConfigError, match="base_model_precision 'int8-quanto' cannot go with model_type 'full'"):
        load(cfg_dir, model_type="full", base_model_precision="int8-quanto")
    (cfg_dir / "old.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="init_lora cannot go with model_type 'full'.*--merge"):
        load(cfg_dir, model_type="full", init_lora=str(cfg_dir / "old.safetensors"))
