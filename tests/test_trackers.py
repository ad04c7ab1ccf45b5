"""report_to: metrics and validation clips reach W&B / TensorBoard when installed, a clear note when not."""
import sys
import types

import numpy as np
import pytest

import train
from hmtiny.trackers import Trackers
from hmtiny.train_config import load_config
from test_outputs import fast_codec  # noqa: F401  (a fixture)
from test_train import TINY, make_run, metrics


def fake_wandb():
    """A stand-in wandb module recording what the trainer sends it."""
    calls = []
    mod = types.ModuleType("wandb")

    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    mod.init = init
    mod.Audio = lambda path, caption=None: ("audio", path)
    return mod, calls


def test_wandb_gets_metrics_and_audio_and_a_missing_tensorboard_is_a_note(tmp_path, monkeypatch, capsys,
                                                                          fast_codec):  # noqa: F811
    if not (TINY / "codec" / "config.json").is_file():
        pytest.skip("the tiny codec is not built")
    pytest.importorskip("soundfile")
    wandb, calls = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    cfg = make_run(tmp_path, max_train_steps=2, checkpointing_steps=0, validation_prompt="pop, piano",
                   validation_audio_duration=0.4, validation_guidance=1.0, validation_step_interval=0,
                   report_to="wandb,tensorboard", tracker_project_name="songs", tracker_run_name="try-1")
    assert train.main([str(cfg)]) == 0
    log = capsys.readouterr().out
    assert "report_to 'tensorboard' needs the tensorboard package" in log and "pip install tensorboard" in log
    init = calls[0]
    assert init[0] == "init" and (init[1]["project"], init[1]["name"]) == ("songs", "try-1")
    steps = [c for c in calls if c[0] == "log" and "train/loss" in c[2]]
    assert [c[1] for c in steps] == [1, 2]
    assert set(steps[0][2]) >= {"train/loss", "train/lr", "train/grad_norm", "train/frames_per_s"}
    assert steps[1][2]["train/loss"] == metrics(tmp_path / "out")[1]["loss"]
    audio = [c for c in calls if c[0] == "log" and "validation/step-2-0" in c[2]]
    assert len(audio) == 1 and audio[0][1] == 2 and audio[0][2]["validation/step-2-0"][1].endswith("step-2-0.wav")
    assert calls[-1] == ("finish",)
    assert (tmp_path / "out" / "metrics.jsonl").is_file() and (tmp_path / "out" / "loss.svg").is_file()


def test_unknown_tracker_is_a_note(tmp_path):
    notes = []
    cfg = load_config(make_run(tmp_path, report_to="comet_ml"))
    assert Trackers(cfg, notes.append).active == []
    assert "report_to 'comet_ml' is not supported here" in notes[0]


def test_tensorboard_writes_scalars_and_audio(tmp_path):
    pytest.importorskip("tensorboard")
    sf = pytest.importorskip("soundfile")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = load_config(make_run(tmp_path, report_to="tensorboard"))
    trackers = Trackers(cfg, lambda m: None)
    for step in (1, 2):
        trackers.log({"step": step, "loss": 3.0 / step, "lr": 1e-4, "grad_norm": 0.5, "frames_per_s": 100.0})
    clip = tmp_path / "step-2-0.wav"
    sf.write(str(clip), np.zeros((4800, 2), np.float32), 48000)
    trackers.audio([clip, tmp_path / "step-2-1.npy"], 2)
    trackers.close()
    events = EventAccumulator(str(tmp_path / "out" / "logs"), size_guidance={"audio": 0}).Reload()
    assert [s.value for s in events.Scalars("train/loss")] == [3.0, 1.5]
    assert {"train/lr", "train/grad_norm", "train/frames_per_s"} <= set(events.Tags()["scalars"])
    assert events.Tags()["audio"] == ["validation/step-2-0"]
