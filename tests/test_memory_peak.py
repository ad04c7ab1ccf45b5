"""bench/memory_peak.py's trace replay (CPU): the peak of a hand-built torch.cuda.memory._snapshot() and what is
alive at it, grouped by where it was allocated."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.memory_peak import peak_report, site  # noqa: E402

ROOT = "/repo"
TORCH = "/usr/lib/python3.11/site-packages/torch"


def frame(filename, line, name):
    return {"filename": filename, "line": line, "name": name}


DROPOUT = [frame(f"{TORCH}/nn/functional.py", 1400, "dropout"), frame(f"{TORCH}/nn/modules/module.py", 1750,
           "_call_impl"), frame(f"{ROOT}/hmtiny/lora.py", 10, "forward"), frame(f"{ROOT}/hmtiny/model.py", 20,
           "forward"), frame(f"{ROOT}/hmtiny/model.py", 90, "loss"), frame(f"{ROOT}/bench/bench_train.py", 30, "run")]
LOGITS = [frame(f"{ROOT}/hmtiny/model.py", 50, "loss"), frame(f"{ROOT}/bench/bench_train.py", 30, "run")]
BACKWARD = [frame("/pytorch/c10/cuda/CUDACachingAllocator.cpp", 1, "c10::cuda::CUDACachingAllocator::malloc"),
            frame("/pytorch/aten/src/ATen/native/cuda/Blas.cpp", 2, "at::native::structured_mm_out_cuda::impl(x)"),
            frame("/pytorch/torch/csrc/autograd/generated/Functions.cpp", 3,
                  "torch::autograd::generated::MmBackward0::apply(std::vector<at::Tensor>&&)")]


def ev(action, addr, size, frames=()):
    return {"action": action, "addr": addr, "size": size, "stream": 0, "frames": list(frames)}


def snapshot():
    trace = [
        ev("segment_alloc", 0x10000, 2 ** 21),  # segments: ignored
        ev("alloc", 0x100, 100, DROPOUT),
        ev("alloc", 0x200, 50, DROPOUT),
        ev("alloc", 0x300, 200),  # autograd's C++ thread: no Python frames
        ev("alloc", 0x400, 30, LOGITS),
        ev("free_requested", 0x400, 30, LOGITS),
        ev("free_completed", 0x400, 30, LOGITS),  # counted once, at the request
        ev("free_requested", 0x900, 300),  # allocated before recording
        ev("free_completed", 0x900, 300),
        ev("alloc", 0x500, 400, LOGITS),  # the peak: 1000 + 100 + 50 + 200 - 300 + 400 = 1450
        ev("snapshot", 0, 0),
        ev("free_requested", 0x500, 400, LOGITS),
        ev("alloc", 0x600, 120, BACKWARD),
        ev("segment_free", 0x10000, 2 ** 21),
    ]
    return {"segments": [], "device_traces": [trace]}


def test_peak_and_groups():
    r = peak_report(snapshot(), device=0, before=1000, root=ROOT, depth=2)
    assert r["events"] == 14
    assert r["peak_bytes"] == 1450 and r["peak_event"] == 9
    assert r["traced_alive_bytes"] == 750 and r["before_alive_at_peak_bytes"] == 700
    assert r["peak_alloc"] == {"bytes": 400, "frames": ["hmtiny/model.py:50 loss", "bench/bench_train.py:30 run"]}
    assert [(g["bytes"], g["count"], g["frames"]) for g in r["groups"]] == [
        (400, 1, ["hmtiny/model.py:50 loss", "bench/bench_train.py:30 run"]),
        (200, 1, ["<no Python frames>"]),
        (150, 2, ["torch/nn/functional.py:dropout", "hmtiny/lora.py:10 forward", "hmtiny/model.py:20 forward"]),
    ]
    assert r["n_groups"] == 3
    assert len(peak_report(snapshot(), before=1000, root=ROOT, top=1)["groups"]) == 1


def test_peak_before_any_allocation_and_empty_trace():
    trace = [ev("free_requested", 0x900, 300), ev("alloc", 0x100, 100, LOGITS)]
    r = peak_report({"segments": [], "device_traces": [trace]}, before=1000, root=ROOT)
    assert r["peak_bytes"] == 1000 and r["peak_event"] == -1 and r["groups"] == [] and r["peak_alloc"] is None
    assert peak_report({"segments": [], "device_traces": []})["events"] == 0


def test_free_completed_only_traces():
    """A trace without free_requested entries (skip_actions) frees at free_completed."""
    trace = [ev("alloc", 0x100, 100, LOGITS), ev("free_completed", 0x100, 100), ev("alloc", 0x200, 60, LOGITS)]
    r = peak_report({"segments": [], "device_traces": [trace]}, root=ROOT)
    assert r["peak_bytes"] == 100 and r["peak_event"] == 0


def test_site_names():
    assert site(DROPOUT, ROOT, depth=1) == ("torch/nn/functional.py:dropout", "hmtiny/lora.py:10 forward")
    # C++ frames (--cpp): the autograd node, then the ATen op; installed packages count as the repository's
    assert site(BACKWARD, ROOT) == ("torch::autograd::generated::MmBackward0::apply",
                                    "at::native::structured_mm_out_cuda::impl")
    installed = frame("/usr/lib/python3.11/site-packages/kernels/rope.py", 5, "fwd")
    assert site([installed], ROOT) == ("kernels/rope.py:5 fwd",)
    assert site([frame("bench/memory_peak.py", 7, "main")], ROOT) == ("bench/memory_peak.py:7 main",)
    assert site([frame(f"{TORCH}/optim/adamw.py", 9, "_fused_adamw")], ROOT) == ("torch/optim/adamw.py:_fused_adamw",)
    assert site([], ROOT) == ("<no Python frames>",)


def test_free_at_request_or_completion():
    """A block another stream still uses is freed (requested) before its memory is back (completed): counted at the
    request the peak is max_memory_allocated's, at completion memory_stats' requested_bytes'."""
    trace = [ev("alloc", 0x100, 100, LOGITS), ev("free_requested", 0x100, 100), ev("alloc", 0x200, 60, DROPOUT),
             ev("free_completed", 0x100, 100)]
    snap = {"segments": [], "device_traces": [trace]}
    assert peak_report(snap, root=ROOT)["peak_bytes"] == 100
    r = peak_report(snap, root=ROOT, free="free_completed")
    assert r["free_at"] == "free_completed" and r["peak_bytes"] == 160 and r["traced_alive_bytes"] == 160
