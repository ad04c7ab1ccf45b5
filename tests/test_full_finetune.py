"""model_type full on the tiny model (CPU): every weight learns, a resume continues exactly, output_dir becomes a
model folder that sample.py loads (official key names), and under `torchrun --nproc_per_node 2` FSDP2 on gloo
trains what one process trains with twice the batch, and resumes on either number of processes."""
import shutil

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

import sample
import train
from hmtiny.checkpoint import iter_tensors
from hmtiny.full_finetune import check, memory_estimate
from hmtiny.train_config import ConfigError, load_config
from test_distributed import max_difference, ok, torchrun
from test_train import TINY, lora as weights, make_run, metrics

FULL = dict(model_type="full", learning_rate=1e-3, lora_rank=None, lora_dropout=None)


def test_every_weight_learns_and_a_resume_continues_exactly(tmp_path):
    cfg = make_run(tmp_path, **FULL, train_batch_size=3, max_train_steps=6, checkpointing_steps=3)
    assert train.main([str(cfg)]) == 0
    out = tmp_path / "out"
    losses = [m["loss"] for m in metrics(out)]
    assert losses[-1] < losses[0] - 0.1, losses  # the same 3 clips every step: the loss must fall
    trained, base = weights(out / "model.safetensors"), dict(iter_tensors(TINY / "model"))
    assert trained.keys() == base.keys() and all(t.dtype == torch.float32 for t in trained.values())
    unchanged = sorted(k for k in base if torch.equal(trained[k], base[k]))
    # everything else moved: both stacks, embeddings, heads, norms, muq_linear's bias. These two get no gradient
    # from this data (no reference audio for muq_linear's weight, no caption dropout for the unconditional row)
    assert unchanged == ["muq_linear.weight", "unconditional_text_embedding.weight"], unchanged
    assert sorted(p.name for p in (out / "checkpoint-3").iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "rng.safetensors", "training_state.json"]

    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    assert train.main([str(cfg), f"--output_dir={resumed}"]) == 0
    assert max_difference(trained, weights(resumed / "model.safetensors")) == 0.0
    assert [m["step"] for m in metrics(resumed)] == [4, 5, 6]


def test_output_dir_is_a_model_folder_for_sample_py(tmp_path, fixtures, capsys):
    """bf16 mixed precision: the model is saved in bf16 under the official key names; validation generates with
    a bf16 copy; sample.py --model output_dir finds the tokenizer and the codec there."""
    cfg = make_run(tmp_path, **FULL, mixed_precision="bf16", max_train_steps=2, checkpointing_steps=0,
                   validation_prompt="pop, piano", validation_audio_duration=0.8, validation_step_interval=0,
                   validation_codec_steps=1)
    assert train.main([str(cfg)]) == 0
    out = tmp_path / "out"
    assert any((out / "validation").glob("step-2-0.*"))
    official = {k: tuple(t.shape) for k, t in iter_tensors(fixtures / "heartmula")}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(official)
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert (out / "config.json").read_text() == (TINY / "model" / "config.json").read_text()
    capsys.readouterr()
    song = tmp_path / "song.wav"
    rc = sample.main(["--model", str(out), "--tags", "pop", "--duration", "0.8", "--ignore-eos", "--seed", "1",
                      "--codec-steps", "1", "--device", "cpu", "--out", str(song)])
    log = capsys.readouterr()
    assert rc == 0, log.out + log.err
    assert song.is_file() and "10 frames" in log.out


def test_what_fsdp_refuses_is_a_config_error(tmp_path):
    for key, value, match in (("mixed_precision", "fp16", "use 'bf16'"),
                              ("scheduled_sampling_max_step_offset", 1, "train on one process")):
        cfg = load_config(make_run(tmp_path, **FULL, **{key: value}), warn=lambda _: None)
        check(cfg, 1)  # one process runs both
        with pytest.raises(ConfigError, match=f"{key}.*model_type 'full' over several processes.*{match}"):
            check(cfg, 2)


def test_memory_estimate_of_the_3b():
    line = memory_estimate(3_938_113_536, 1)
    assert line.startswith("memory: 58.7 GiB per GPU") and "(14.7 + 14.7 + 29.3)" in line
    assert memory_estimate(3_938_113_536, 4).startswith("memory: 14.7 GiB per GPU (4 processes)")


# ---------------------------------------------------------------- FSDP2 under torchrun (gloo, CPU)
def fsdp_runs_on_gloo() -> str | None:
    """Why FSDP2 cannot run here, or None."""
    if not (dist.is_available() and dist.is_gloo_available()):
        return "torch.distributed with gloo is not available in this torch build"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        return f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard): {e}"
    return None


# 9 clips in global batches of 4: each epoch's third batch holds one clip, so one rank computes a stand-in at
# weight 0; gradient checkpointing recomputes the sharded blocks; validation at step 2 generates with the weights
# gathered to rank 0, and training goes on unchanged
RUN = dict(FULL, tracks=tuple(f"{i:02d}" for i in range(1, 10)), max_train_steps=4, checkpointing_steps=2,
           gradient_checkpointing=True, validation_prompt="pop", validation_audio_duration=0.4,
           validation_step_interval=2, validation_codec_steps=1)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    reason = fsdp_runs_on_gloo()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("fsdp")
    cfg = make_run(root, **RUN)
    assert train.main([str(cfg), "--train_batch_size=4", f"--output_dir={root / 'one'}"]) == 0
    log = ok(torchrun(cfg, "--train_batch_size=2", f"--output_dir={root / 'two'}", timeout=180))
    return root, cfg, log


def test_fsdp_on_two_processes_trains_as_one_with_twice_the_batch(fsdp_runs):
    root, _, log = fsdp_runs
    assert "FSDP2 over 2 processes" in log and "2 clip(s) x 1 accumulation x 2 processes = 4 clip(s)" in log
    assert sorted(p.name.split(".")[0] for p in (root / "two" / "validation").iterdir()) == ["step-2-0", "step-4-0"]
    one, two = weights(root / "one" / "model.safetensors"), weights(root / "two" / "model.safetensors")
    assert max_difference(one, two) < 1e-5
    assert [m["loss"] for m in metrics(root / "two")] == pytest.approx([m["loss"] for m in metrics(root / "one")],
                                                                       rel=1e-5)
    ckpt = root / "two" / "checkpoint-4"  # gathered whole: the same names and shapes as one process writes
    assert max_difference(weights(root / "one" / "checkpoint-4" / "optimizer.safetensors"),
                          weights(ckpt / "optimizer.safetensors")) < 1e-5


def test_fsdp_resumes_on_two_processes_and_on_one(fsdp_runs):
    root, cfg, _ = fsdp_runs
    straight = weights(root / "two" / "model.safetensors")
    for name, run in (("two-again", lambda out: ok(torchrun(cfg, "--train_batch_size=2", f"--output_dir={out}",
                                                             timeout=180))),
                      ("one-again", lambda out: train.main([str(cfg), "--train_batch_size=4", "--resume_anyway=true",
                                                            f"--output_dir={out}"]) == 0 or pytest.fail("exit 1"))):
        out = root / name
        shutil.copytree(root / "two" / "checkpoint-2", out / "checkpoint-2")
        run(out)
        assert max_difference(straight, weights(out / "model.safetensors")) < 1e-5, name
        assert [m["step"] for m in metrics(out)] == [3, 4]
