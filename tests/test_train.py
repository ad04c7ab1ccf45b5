"""train.py end to end on the tiny assets (CPU): outputs, learning, exact resume, init_lora, bad inputs, NaN stop."""
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from hmtiny.lora import read_lora
from hmtiny.model import HeartMuLa
from hmtiny.train_config import BUILTIN_CONFIG
from hmtiny.trainer import lr_factor

TINY = BUILTIN_CONFIG.parent
NO_VALIDATION = ["--validation_prompt=null"]


def make_run(folder: Path, tracks=("01", "02", "03"), **overrides) -> Path:
    """A config + multidatabackend.json in `folder` training the tiny model on some of the tiny tracks."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for t in tracks:
        for f in TINY.glob(f"dataset/track_{t}.*"):
            shutil.copy(f, data / f.name)
    (folder / "multidatabackend.json").write_text(json.dumps([
        {"id": "tiny", "type": "local", "dataset_type": "audio", "instance_data_dir": "data",
         "caption_strategy": "textfile", "metadata_backend": "discovery"},
        {"id": "text-embeds", "dataset_type": "text_embeds", "type": "local"}]))  # skipped with a note
    cfg = {"model_family": "heartmula", "model_type": "lora", "model_flavour": "3b",
           "pretrained_model_name_or_path": str(TINY / "model"), "data_backend_config": "multidatabackend.json",
           "output_dir": str(folder / "out"), "mixed_precision": "no", "seed": 3, "train_batch_size": 1,
           "learning_rate": 3e-3, "lr_scheduler": "constant", "max_train_steps": 4, "num_train_epochs": 0,
           "lora_rank": 4, "lora_dropout": 0.0, "gradient_checkpointing": False, "checkpointing_steps": 2,
           "checkpoints_total_limit": 10, "validation_prompt": None}
    cfg.update(overrides)
    path = folder / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def lora(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_schedules():
    assert lr_factor("constant", 0, 10, 100) == 1.0
    assert [lr_factor("constant_with_warmup", s, 4, 100) for s in (0, 2, 4, 99)] == [0.0, 0.5, 1.0, 1.0]
    assert lr_factor("cosine", 4, 4, 104) == 1.0 and abs(lr_factor("cosine", 54, 4, 104) - 0.5) < 1e-12
    assert lr_factor("cosine", 104, 4, 104) == 0.0
    assert lr_factor("linear", 2, 4, 104) == 0.5 and abs(lr_factor("linear", 54, 4, 104) - 0.5) < 1e-12


def test_builtin_default_end_to_end(tmp_path, monkeypatch, capsys):
    """`python train.py` with no config: the shipped tiny default (shortened here) writes a LoRA, checkpoints,
    metrics, a loss curve and a validation clip."""
    monkeypatch.chdir(tmp_path)
    assert train.main(["--output_dir=run", "--max_train_steps=4", "--checkpointing_steps=2",
                       "--validation_step_interval=0", "--validation_audio_duration=0.4"]) == 0
    out = tmp_path / "run"
    log = capsys.readouterr().out
    assert "step 4/4" in log and "audio frames/s" in log and "ETA" in log
    lw = read_lora(out / "pytorch_lora_weights.safetensors")
    assert lw.rank == 4 and len(lw.modules) == 35
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(out.glob(".*"))  # no temporary folders left behind
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert (out / "loss.svg").read_text().startswith("<svg")
    clips = sorted((out / "validation").iterdir())
    if (TINY / "codec" / "config.json").is_file():
        import soundfile as sf
        assert [c.name for c in clips] == ["step-4-0.wav"]
        wav, sr = sf.read(clips[0])
        assert sr == 48000 and wav.ndim == 2 and wav.shape[1] == 2
    else:
        assert [c.name for c in clips] == ["step-4-0.npy"]


def test_loss_on_two_repeated_clips_falls_by_more_than_half(tmp_path):
    cfg = make_run(tmp_path, tracks=("01", "02"), train_batch_size=2, learning_rate=1e-2, lora_rank=8,
                   max_train_steps=25, checkpointing_steps=0)
    assert train.main([str(cfg)]) == 0
    losses = [m["loss"] for m in metrics(tmp_path / "out")]
    assert losses[-1] < 0.5 * losses[0], losses
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # checkpointing_steps 0: only the final LoRA


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """6 steps straight == 3 steps, a crash, then resume_from_checkpoint=latest for the rest: dropout, data order,
    accumulation, warm-up + cosine schedule and Adam moments all carry over."""
    common = dict(lora_dropout=0.2, gradient_accumulation_steps=2, lr_scheduler="cosine", lr_warmup_steps=2,
                  max_train_steps=6, checkpointing_steps=3, tracks=("01", "02", "03", "04", "05"))
    straight = make_run(tmp_path / "a", **common)
    assert train.main([str(straight)]) == 0

    resumed = make_run(tmp_path / "b", **common)
    real_save = train.save_checkpoint

    def crash_after_first_checkpoint(out, step, *args, **kwargs):
        path = real_save(out, step, *args, **kwargs)
        raise KeyboardInterrupt(f"simulated crash after {path.name}")

    monkeypatch.setattr(train, "save_checkpoint", crash_after_first_checkpoint)
    assert train.main([str(resumed)]) == 1  # Ctrl-C: an error message, exit 1
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    out_b = tmp_path / "b" / "out"
    assert not (out_b / "pytorch_lora_weights.safetensors").exists()
    assert train.main([str(resumed)]) == 0

    a = lora(tmp_path / "a" / "out" / "pytorch_lora_weights.safetensors")
    b = lora(out_b / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # it did train
    assert [m["step"] for m in metrics(out_b)] == list(range(1, 7))
    la, lb = metrics(tmp_path / "a" / "out"), metrics(out_b)
    assert [m["loss"] for m in la] == pytest.approx([m["loss"] for m in lb], rel=1e-6)


def test_resume_keeps_a_random_seed(tmp_path, monkeypatch):
    """seed null draws a seed; the resumed run must reuse it (data order, dropout) rather than draw another."""
    run = make_run(tmp_path / "a", seed=None, lora_dropout=0.3, max_train_steps=4, checkpointing_steps=2,
                   tracks=("01", "02", "03", "04"))
    real_save = train.save_checkpoint

    def crash(out, step, *args, **kwargs):
        real_save(out, step, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", crash)
    assert train.main([str(run)]) == 1  # Ctrl-C: an error message, exit 1
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    seed = json.loads((tmp_path / "a" / "out" / "checkpoint-2" / "training_state.json").read_text())["config"]["seed"]
    assert isinstance(seed, int)
    assert train.main([str(run)]) == 0
    straight = make_run(tmp_path / "b", seed=seed, lora_dropout=0.3, max_train_steps=4, checkpointing_steps=2,
                        tracks=("01", "02", "03", "04"))
    assert train.main([str(straight)]) == 0
    a = lora(tmp_path / "a" / "out" / "pytorch_lora_weights.safetensors")
    b = lora(tmp_path / "b" / "out" / "pytorch_lora_weights.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_init_lora_starts_from_the_given_weights(tmp_path):
    src = make_run(tmp_path / "src", max_train_steps=3, checkpointing_steps=0)
    assert train.main([str(src)]) == 0
    given = tmp_path / "src" / "out" / "pytorch_lora_weights.safetensors"
    # warm-up makes the first update's lr 0: the run ends exactly where it started
    run = make_run(tmp_path / "init", max_train_steps=1, lr_scheduler="constant_with_warmup", lr_warmup_steps=5,
                   checkpointing_steps=0, adam_weight_decay=0.0)
    assert train.main([str(run), f"--init_lora={given}"]) == 0
    g, r = lora(given), lora(tmp_path / "init" / "out" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(g[k], r[k]) for k in g)
    fresh = make_run(tmp_path / "fresh", max_train_steps=1, checkpointing_steps=0)
    assert train.main([str(fresh)]) == 0
    # same seed, same first batch: only the starting weights differ
    assert metrics(tmp_path / "init" / "out")[0]["loss"] != metrics(tmp_path / "fresh" / "out")[0]["loss"]


@pytest.fixture
def finished_run(tmp_path):
    """A completed run whose outputs the bad invocations below must leave untouched."""
    cfg = make_run(tmp_path, max_train_steps=2, checkpointing_steps=2, checkpoints_total_limit=1)
    assert train.main([str(cfg)]) == 0
    return cfg, tmp_path / "out"


def bad_token_file(folder: Path) -> Path:
    data = folder / "data"
    shutil.copy(data / "track_01.txt", data / "track_99.txt")
    shutil.copy(data / "track_01.wav", data / "track_99.wav")
    np.save(data / "track_99.tokens.npy", np.zeros((8, 8), dtype=np.int64))
    return data / "track_99.tokens.npy"


@pytest.mark.parametrize("args,expected", [
    (["--lora_rnak=8"], ["lora_rnak", "did you mean 'lora_rank'"]),
    (["--learning_rate=fast"], ["learning_rate must be a number"]),
    (["--learning_rate=-0.1"], ["learning_rate must be > 0"]),
    (["--lora_rank=0"], ["lora_rank must be > 0"]),
    (["--lr_scheduler=polynomial"], ["lr_scheduler 'polynomial'"]),
    (["--model_family=flux"], ["model_family"]),
    (["--model_type=full"], ["model_type", "trained with 'lora'", "asks for 'full'"]),  # not a LoRA resume
    (["--data_backend_config=missing.json"], ["data_backend_config", "missing.json"]),
    (["--init_lora=nowhere.safetensors"], ["init_lora", "nowhere.safetensors"]),
    (["--lora_target_modules=q_projj"], ["q_projj"]),
    (["--pretrained_model_name_or_path=/no/such/model"], ["pretrained_model_name_or_path", "/no/such/model"]),
    (["--lora_rank=8"], ["lora_rank", "checkpoint-2"]),  # resuming a rank-4 checkpoint
    (["--resume_from_checkpoint=null"], ["already holds an earlier run", "nothing was overwritten"]),
    ("bad_tokens", ["track_99.tokens.npy", "ambiguous"]),
    ("init_lora_rank", ["init_lora", "lora_rank"]),
])
def test_bad_inputs_exit_nonzero_and_touch_nothing(finished_run, tmp_path, capsys, monkeypatch, args, expected):
    cfg, out = finished_run
    if args == "bad_tokens":
        bad_token_file(tmp_path)
        args = ["--output_dir=" + str(tmp_path / "out2")]
    elif args == "init_lora_rank":
        other = make_run(tmp_path / "r8", lora_rank=8, max_train_steps=1, checkpointing_steps=0)
        assert train.main([str(other)]) == 0
        args = [f"--init_lora={tmp_path / 'r8' / 'out' / 'pytorch_lora_weights.safetensors'}",
                "--output_dir=" + str(tmp_path / "out3")]
    before = snapshot(out)
    capsys.readouterr()

    def no_model_load(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr("hmtiny.trainer.load_heartmula", no_model_load)
    assert train.main([str(cfg), *args]) == 1
    err = capsys.readouterr().err
    assert [l.split(":")[0] for l in err.splitlines() if not l.startswith("warning: ")][0] == "error", err
    for text in expected:
        assert text in err, err
    assert snapshot(out) == before
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    cfg = make_run(tmp_path, max_train_steps=6, checkpointing_steps=2)
    real_loss = HeartMuLa.loss
    calls = {"n": 0}

    def loss_going_nan(self, *args, **kwargs):
        loss, info = real_loss(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * math.nan if calls["n"] == 3 else loss), info

    monkeypatch.setattr(HeartMuLa, "loss", loss_going_nan)
    assert train.main([str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 3" in err and "checkpoint-2" in err
    out = tmp_path / "out"
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert [m["step"] for m in metrics(out)] == [1, 2]
    # the checkpoint is whole: resuming from it works and finishes the run
    monkeypatch.setattr(HeartMuLa, "loss", real_loss)
    assert train.main([str(cfg)]) == 0
    assert [m["step"] for m in metrics(out)] == list(range(1, 7))


@pytest.mark.parametrize("layout", ["ckpt", "ckpt_model_folder", "separate"])
def test_model_locations(tmp_path, layout):
    """heartlib's ckpt/ folder (HeartMuLa-oss-3B/, HeartCodec-oss/, tokenizer.json, gen_config.json), its model
    subfolder, and separate paths for model, tokenizer, gen_config and codec all find every piece."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(TINY / "model", ckpt / "HeartMuLa-oss-3B")
    has_codec = (TINY / "codec" / "config.json").is_file()
    if has_codec:
        shutil.copytree(TINY / "codec", ckpt / "HeartCodec-oss")
    if layout == "separate":
        for name in ("tokenizer.json", "gen_config.json"):
            (tmp_path / "text").mkdir(exist_ok=True)
            shutil.copy(TINY / name, tmp_path / "text" / ("gen.json" if name == "gen_config.json" else name))
        paths = {"pretrained_model_name_or_path": str(ckpt / "HeartMuLa-oss-3B"),
                 "tokenizer_path": str(tmp_path / "text" / "tokenizer.json"),
                 "gen_config_path": str(tmp_path / "text" / "gen.json"),
                 "codec_path": str(ckpt / "HeartCodec-oss") if has_codec else None}
    else:
        for name in ("tokenizer.json", "gen_config.json"):
            shutil.copy(TINY / name, ckpt / name)
        paths = {"pretrained_model_name_or_path": str(ckpt if layout == "ckpt" else ckpt / "HeartMuLa-oss-3B")}
    cfg = make_run(tmp_path, max_train_steps=1, checkpointing_steps=0, validation_prompt="pop, piano",
                   validation_audio_duration=0.4, validation_guidance=1.0, **paths)
    assert train.main([str(cfg)]) == 0
    clips = [p.suffix for p in (tmp_path / "out" / "validation").iterdir()]
    assert clips == ([".wav"] if has_codec else [".npy"])


def test_compiled_blocks_compute_the_same_step(tmp_path):
    """dynamo_backend (SimpleTuner's name) compiles every block; aot_eager exercises the path without codegen."""
    runs = {}
    for backend in ("no", "aot_eager"):
        cfg = make_run(tmp_path / backend, max_train_steps=2, checkpointing_steps=0, lora_dropout=0.1,
                       gradient_checkpointing=True, dynamo_backend=backend)
        assert train.main([str(cfg)]) == 0
        runs[backend] = metrics(tmp_path / backend / "out")
    assert [m["loss"] for m in runs["aot_eager"]] == pytest.approx([m["loss"] for m in runs["no"]], rel=1e-5)


def test_checkpoint_pruning_and_contents(tmp_path):
    cfg = make_run(tmp_path, max_train_steps=5, checkpointing_steps=1, checkpoints_total_limit=2,
                   mixed_precision="bf16", gradient_checkpointing=True)
    assert train.main([str(cfg)]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    ck = out / "checkpoint-5"
    assert sorted(p.name for p in ck.iterdir()) == ["optimizer.safetensors", "pytorch_lora_weights.safetensors",
                                                     "rng.safetensors", "training_state.json"]
    state = json.loads((ck / "training_state.json").read_text())
    assert state["step"] == 5 and state["lora"]["rank"] == 4 and "epoch" in state["sampler"]
    assert lora(ck / "pytorch_lora_weights.safetensors").keys() == lora(out / "pytorch_lora_weights.safetensors").keys()


def test_nan_read_one_step_late_still_skips_the_update(tmp_path, monkeypatch, capsys):
    """With fused AdamW (CUDA's optimizer) train.py reads a step's loss one step late; a NaN at step 3 must still
    leave the LoRA as it was after step 2: the optimizer skips its update on the device from the bad step on."""
    from hmtiny.lora import lora_state_dict
    cfg = make_run(tmp_path, max_train_steps=6, checkpointing_steps=2, lora_dropout=0.1)
    real_loss, real_build = HeartMuLa.loss, train.build_model
    calls, models = {"n": 0}, []

    def loss_going_nan(self, *args, **kwargs):
        loss, info = real_loss(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * math.nan if calls["n"] == 3 else loss), info

    def fused(cfg, params, device):
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay, fused=True)
        return opt

    monkeypatch.setattr(HeartMuLa, "loss", loss_going_nan)
    monkeypatch.setattr(train, "make_optimizer", fused)
    monkeypatch.setattr(train, "build_model", lambda *a, **k: models.append(real_build(*a, **k)) or models[-1])
    assert train.main([str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 3" in err and "checkpoint-2" in err
    out = tmp_path / "out"
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert [m["step"] for m in metrics(out)] == [1, 2]
    after_2 = lora(next(out.glob("checkpoint-2/*lora*.safetensors")))
    now = lora_state_dict(models[0])
    assert after_2.keys() == now.keys()
    for k in now:  # steps 3 and 4 (queued before the NaN was read) changed nothing
        assert torch.equal(now[k].float(), after_2[k]), k


def test_graphs_kept_through_validation_only_where_the_card_has_room():
    """Before the first validation nothing is measured: only a card with several times a validation's seen need
    keeps the training graphs (an 80 GB card does, a 12-24 GB one frees them); afterwards the measured need
    decides, with half a GiB to spare. Longer and more clips ask for more room."""
    from hmtiny.train_config import TrainConfig
    from hmtiny.trainer import keep_graphs_for_validation
    GiB = 2**30
    cfg = TrainConfig()  # one 30 s clip
    assert keep_graphs_for_validation(60 * GiB, None, cfg)
    assert not keep_graphs_for_validation(9 * GiB, None, cfg)  # under 8 + 2 GiB
    assert keep_graphs_for_validation(3 * GiB, 2 * GiB, cfg)  # measured: 2 GiB + 0.5 fit in 3
    assert not keep_graphs_for_validation(int(2.4 * GiB), 2 * GiB, cfg)
    many = TrainConfig(num_validation_images=4, validation_audio_duration=60.0)  # 8 + 2 * 4 * 2 = 24 GiB
    assert not keep_graphs_for_validation(20 * GiB, None, many) and keep_graphs_for_validation(25 * GiB, None, many)
