"""train.py under `torchrun --nproc_per_node 2` (gloo, CPU) on the tiny model: two processes of 2 clips train the
LoRA one process of 4 clips trains, a resume (on either number of processes) continues exactly, and a failure on
rank 0 or a bad config stops both ranks with one error line and exit 1."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

import train
from test_train import lora, make_run, metrics

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this torch build")

# 9 clips in global batches of 4: the third batch of each epoch holds one clip, so one rank has none
RUN = dict(tracks=tuple(f"{i:02d}" for i in range(1, 10)), learning_rate=1e-2, max_train_steps=4,
           checkpointing_steps=2, lora_dropout=0.0)


def torchrun(*args, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "train.py"), *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 4 steps by one process of 4 clips and by two of 2."""
    root = tmp_path_factory.mktemp("distributed")
    cfg = make_run(root, **RUN)
    assert train.main([str(cfg), "--train_batch_size=4", f"--output_dir={root / 'one'}"]) == 0
    two_log = ok(torchrun(cfg, "--train_batch_size=2", f"--output_dir={root / 'two'}"))
    return root, cfg, two_log


def stopped_at_step_2(root: Path, name: str) -> Path:
    """A folder holding only the two-process run's checkpoint-2: that run as if it had stopped there."""
    shutil.copytree(root / "two" / "checkpoint-2", root / name / "checkpoint-2")
    return root / name


def test_two_processes_train_as_one_with_twice_the_batch(runs):
    root, _, log = runs
    assert "2 clip(s) x 1 accumulation x 2 processes = 4 clip(s) per step" in log
    assert log.count("step 4/4") == 1  # rank 0 alone logs
    one = lora(root / "one" / "pytorch_lora_weights.safetensors")
    two = lora(root / "two" / "pytorch_lora_weights.safetensors")
    assert max_difference(one, two) < 1e-5
    assert max(v.abs().max().item() for k, v in two.items() if "lora_B" in k) > 1e-3  # it did train
    m1, m2 = metrics(root / "one"), metrics(root / "two")
    assert [m["frames"] for m in m1] == [m["frames"] for m in m2]  # the same clips in every step
    assert [m["loss"] for m in m2] == pytest.approx([m["loss"] for m in m1], rel=1e-5)
    assert sorted(p.name for p in (root / "two").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_resume_under_torchrun_continues_exactly(runs):
    root, cfg, _ = runs
    out = stopped_at_step_2(root, "resumed")
    log = ok(torchrun(cfg, "--train_batch_size=2", f"--output_dir={out}"))
    assert "resumed from" in log and "at step 2" in log
    straight = lora(root / "two" / "pytorch_lora_weights.safetensors")
    assert max_difference(straight, lora(out / "pytorch_lora_weights.safetensors")) < 1e-6
    assert [m["step"] for m in metrics(out)] == [3, 4]


def test_one_process_resumes_a_two_process_checkpoint(runs, capsys):
    """The checkpoint holds the global data position: one process of 4 clips continues the 2 x 2 run exactly."""
    root, cfg, _ = runs
    out = stopped_at_step_2(root, "single")
    assert train.main([str(cfg), "--train_batch_size=4", "--resume_anyway=true", f"--output_dir={out}"]) == 0
    assert "was trained by 2 process(es), this run has 1" in capsys.readouterr().out
    straight = lora(root / "one" / "pytorch_lora_weights.safetensors")
    assert max_difference(straight, lora(out / "pytorch_lora_weights.safetensors")) < 1e-5


def test_bad_config_is_one_error_on_every_rank(tmp_path):
    proc = torchrun("--learning_rate=-1", f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode != 0
    assert proc.stderr.count("error: learning_rate must be > 0") == 1
    assert 'train.py", line' not in proc.stderr  # no traceback
    assert not (tmp_path / "out").exists()


def test_rank0_failing_to_write_stops_every_rank(tmp_path):
    """A folder where rank 0 writes loss.svg: its first checkpoint fails; rank 1, waiting for it, stops too
    (subprocess's timeout fails the test should a rank hang)."""
    cfg = make_run(tmp_path, **RUN)
    (tmp_path / "out" / "loss.svg").mkdir(parents=True)
    proc = torchrun(cfg, "--train_batch_size=2", "--checkpointing_steps=1", timeout=90)
    assert proc.returncode != 0
    assert proc.stderr.count("error: ") == 1 and "Is a directory" in proc.stderr and "loss.svg" in proc.stderr
    assert 'train.py", line' not in proc.stderr
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
