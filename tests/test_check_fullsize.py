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
