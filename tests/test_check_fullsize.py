"""bench/check_fullsize.py --tiny: a user's whole workflow (train with validations and checkpoints, resume with more
steps, sample with the LoRA) as separate processes on the built-in tiny model. The same script runs the full-size
model on a GPU."""
import json
import subprocess
import sys

from conftest import REPO


def test_tiny_workflow_end_to_end(tmp_path):
    script = str(REPO / "bench" / "check_fullsize.py")
    proc = subprocess.run([sys.executable, script, "--tiny", "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "report.json").read_text())
    assert proc.returncode == 0 and report["ok"], proc.stdout[-3000:] + proc.stderr[-3000:]
    train, resume, sample = report["processes"]
    assert [v["step"] for v in train["validations"]] == [2, 4, 6] and [v["step"] for v in resume["validations"]] == [8]
    assert train["steps"] == 6 and resume["steps"] == 2
    assert sample["generated_frames"] == 25
    assert "song.wav" in report["files"] and "out/pytorch_lora_weights.safetensors" in report["files"]
    assert [row[0] for row in train["step_ms"]] == [1, 2, 3, 4, 5, 6]  # every step: [step, frames, ms, capture ms]


def test_a_training_step_that_fell_back_to_eager_fails_the_check(tmp_path):
    """A process whose log has the captured step's fallback warning fails the check (it exits 0, but runs slowly
    and is not what users get), as a crash or a traceback does."""
    sys.path.insert(0, str(REPO / "bench"))
    import check_fullsize
    fine = tmp_path / "fine.py"
    fine.write_text("print('step 1 | loss 1.0')\n")
    slow = tmp_path / "slow.py"
    slow.write_text("print('warning: the training step could not be captured in a CUDA graph (x); running it "
                    "eagerly from now on')\n")
    assert check_fullsize.run_process("fine", [str(fine)], tmp_path / "fine.log", tmp_path)["process"] == "fine"
    try:
        check_fullsize.run_process("slow", [str(slow)], tmp_path / "slow.log", tmp_path)
    except check_fullsize.CheckFailed as e:
        assert "fell back to eager" in str(e)
    else:
        raise AssertionError("the eager fallback was not caught")
    source = (REPO / "hmtiny" / "captured_step.py").read_text()
    assert check_fullsize.EAGER_FALLBACK in source  # the check looks for the words the step really writes
