"""hmtiny.runtime: the device, dtype, sampling-argument and codec rules sample.py and validation share."""
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from hmtiny import runtime
from hmtiny.tiny import ASSETS as TINY

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("topk", [0, 1, 50])
def test_topk_zero_means_no_topk_and_is_allowed(topk):
    runtime.check_sampling(topk, 1.0, 1.0)


@pytest.mark.parametrize("topk, temperature, cfg_scale, message", [
    (-1, 1.0, 1.0, "topk must be an integer >= 0 (0 = no top-k, 1 = greedy), got -1"),
    (2.5, 1.0, 1.0, "topk must be an integer >= 0"),
    (50, 0.0, 1.0, "temperature must be > 0"),
    (50, math.nan, 1.0, "temperature must be a finite number"),
    (50, 1.0, 0.5, "cfg_scale must be >= 1 (1 = no guidance)"),
    (50, 1.0, math.inf, "cfg_scale must be a finite number"),
])
def test_bad_sampling_arguments_are_named(topk, temperature, cfg_scale, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        runtime.check_sampling(topk, temperature, cfg_scale)
    flag = message.split()[0]
    names = ("--topk", "--temperature", "--cfg")
    with pytest.raises(ValueError, match="--" + {"cfg_scale": "cfg"}.get(flag, flag)):
        runtime.check_sampling(topk, temperature, cfg_scale, names=names)


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.pick_device() == torch.device("cpu")
    assert runtime.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        runtime.pick_device("cuda:1")
    with pytest.raises(ValueError, match="not a device"):
        runtime.pick_device("gpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.pick_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.pick_device() == torch.device("cuda")


def test_codec_dtype_keeps_sample_and_validation_defaults():
    cuda, cpu, mps = torch.device("cuda"), torch.device("cpu"), torch.device("mps")
    assert runtime.codec_dtype_name(cuda) == "tf32"  # sample.py: accuracy at nearly bf16's speed
    assert runtime.codec_dtype_name(cuda, beside_training=True) == "bf16"  # validation: half the memory
    assert runtime.codec_dtype_name(cuda, model_dtype=torch.float32) == "fp32"
    assert runtime.codec_dtype_name(cpu) == runtime.codec_dtype_name(mps) == "fp32"
    assert runtime.codec_dtype_name(cuda, "fp32", beside_training=True) == "fp32"


def test_codec_beside_training_off_cuda_lives_on_the_device_and_decodes_frames():
    codec = runtime.load_codec_for(TINY / "codec", torch.device("cpu"), "fp32", beside_training=True)
    assert codec.device.type == "cpu"
    frames = torch.randint(0, codec.cfg.codebook_size, (10, codec.cfg.num_quantizers))  # [T, 8] as generated
    wav = runtime.decode_frames(codec, frames, steps=2, guidance=1.25, seed=5, device=torch.device("cpu"))
    assert wav.shape == (2, int(10 / runtime.FRAME_RATE * codec.sample_rate))
    assert torch.equal(wav, codec.decode(frames.T, steps=2, guidance=1.25, seed=5))


def test_warm_triton_never_raises(monkeypatch):
    """Best effort in a thread (here without CUDA its driver step fails): nothing escapes, Background returns None."""
    job = runtime.Background(runtime.warm_triton)
    assert job.result() is None and job.error is None


def test_warm_triton_leaves_torch_dynamo_alone():
    """warm_triton runs beside the model load: it must not import torch._dynamo (~1.5 s of Python holding the GIL
    the load needs), which nothing in sample.py's path needs (kernels/custom_op.py; tests/test_custom_op.py). In a
    fresh process, so that nothing else has imported it."""
    import subprocess
    code = ("import sys\nfrom hmtiny import runtime\nassert 'torch._dynamo' not in sys.modules\n"
            "runtime.warm_triton()\nprint('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[-1] == "False", (out.stdout, out.stderr[-2000:])
