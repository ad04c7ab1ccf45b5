"""The MPS path's dtype and RNG rules, exercised on CPU: MPS has no float64, so with the MPS rule forced on, the
codec's crossfade of several windows and a training run that checkpoints and resumes must create no float64
tensor; a resumed run on MPS restores the MPS generator."""
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hmtiny.device
from hmtiny.codec import plan_windows
from hmtiny.codec.codec import crossfade_windows
from hmtiny.trainer import rng_state, set_rng_state
from hmtiny.train_config import BUILTIN_CONFIG


class NoFloat64(TorchDispatchMode):
    """Fails the first op that returns a float64 tensor, as MPS would."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                raise AssertionError(f"{func} made a float64 tensor (MPS has none)")
        return out


def mps_rules(monkeypatch):
    monkeypatch.setattr(hmtiny.device, "supports_float64", lambda device: False)


def test_crossfade_of_several_windows_without_float64(monkeypatch):
    plan = plan_windows(120, 93, 48000, True)  # two windows, one overlap
    windows = torch.randn(len(plan.starts), 2, plan.window_samples, generator=torch.Generator().manual_seed(0))
    exact = crossfade_windows(windows, plan)
    mps_rules(monkeypatch)
    with NoFloat64():
        wav = crossfade_windows(windows, plan)
    assert len(plan.starts) == 2 and torch.allclose(wav, exact, atol=1e-6)


def test_training_and_resume_without_float64(monkeypatch, tmp_path):
    import train
    mps_rules(monkeypatch)
    monkeypatch.chdir(tmp_path)
    args = [str(BUILTIN_CONFIG), "--output_dir=run", "--checkpointing_steps=1", "--validation_prompt=null"]
    with NoFloat64():
        assert train.main(args + ["--max_train_steps=1"]) == 0
        assert train.main(args + ["--max_train_steps=2"]) == 0  # resumes: checkpoint, optimizer and RNG loading
    assert [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_mps_generator_is_saved_and_restored(monkeypatch):
    state = {"now": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: state["now"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda s: state.update(now=s.clone()))
    tensors, meta = rng_state(torch.device("mps"))
    saved = tensors["torch_mps"]
    state["now"] = torch.zeros(16, dtype=torch.uint8)  # the generator moved on (or a new process started)
    set_rng_state(tensors, meta, torch.device("mps"))
    assert torch.equal(state["now"], saved)
