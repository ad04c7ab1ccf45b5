"""kernels/ahead.py: inside `compiling()` a launch becomes a queued compilation (once per specialisation) and its
outputs are zeroed; outside, it launches. The CUDA test compiles a real kernel ahead and then launches it."""
import threading

import pytest
import torch

from kernels import ahead


class FakeKernel:
    """Records launches and warm-ups (Triton's JITFunction has both: kernel[grid](...) and kernel.warmup(...))."""

    def __init__(self, fail=False):
        self.launched, self.warmed, self.threads, self.fail = [], [], set(), fail

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append((grid, args, kwargs))

    def warmup(self, *args, grid, **kwargs):
        self.threads.add(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("does not compile")
        self.warmed.append((grid, args, kwargs))


def test_launch_outside_the_block_runs_the_kernel():
    k, y = FakeKernel(), torch.ones(3)
    ahead.launch(k, (2,), y, 7, BLOCK=16, zero=(y,))
    assert k.launched == [((2,), (y, 7), {"BLOCK": 16})] and not k.warmed
    assert torch.equal(y, torch.ones(3))  # a real launch: nothing zeroed


def test_inside_the_block_each_specialisation_compiles_once_and_outputs_are_zeroed():
    k = FakeKernel()
    a, b = torch.ones(4), torch.ones(4)
    h = torch.ones(4, dtype=torch.float64)
    with ahead.compiling(torch.device("cpu"), workers=2):
        assert ahead.active()
        ahead.launch(k, (1,), a, 32, BLOCK=16, zero=(a,))
        ahead.launch(k, (5,), b, 64, BLOCK=16, zero=(b, None))  # same dtypes, 16-divisible ints: the same kernel
        ahead.launch(k, (1,), h, 32, BLOCK=16, zero=(h,))  # another dtype
        ahead.launch(k, (1,), a, 33, BLOCK=16)  # an int not divisible by 16
        ahead.launch(k, (1,), a, 32, BLOCK=32)  # another constexpr
    assert not ahead.active()
    assert not k.launched
    assert len(k.warmed) == 4, k.warmed  # every queued compilation finished when the block ended
    assert all(name.startswith("hmtiny-compile") for name in k.threads)
    assert not a.any() and not b.any() and not h.any()


def test_a_failed_compilation_is_left_for_the_real_launch():
    k = FakeKernel(fail=True)
    with ahead.compiling(torch.device("cpu"), workers=1):
        ahead.launch(k, (1,), torch.ones(2))
    ahead.launch(k, (1,), torch.ones(2))  # after the block: launched as usual
    assert len(k.launched) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and triton")
def test_a_gemv_compiled_ahead_then_launched_matches_the_reference():
    from kernels import gemv
    if gemv.triton is None:
        pytest.skip("triton not installed")
    torch.manual_seed(0)
    x = torch.randn(2, 1536, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 1536, device="cuda", dtype=torch.bfloat16)
    tile = (32, 128, 1, 4)
    with ahead.compiling(x.device):
        y = gemv.linear_tiled(x, w, tile, None)
    assert not y.any()  # not run: zeroed
    assert any(gemv._gemv_kernel.device_caches[x.device.index or 0][0].values())  # compiled
    y = gemv.linear_tiled(x, w, tile, None)
    torch.testing.assert_close(y.float(), gemv.gemv_ref(x, w).float(), rtol=2e-2, atol=2e-2)
