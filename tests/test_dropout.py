"""Seeded dropout (kernels/dropout.py): the Triton kernel equals the torch reference bit for bit (interpreter on
CPU, the real kernel on CUDA), masks are reproducible from the seed, independent across seeds and salts, and the
backward uses the forward's mask."""
import json

import pytest
import torch

from kernels import dropout as dk

triton = pytest.importorskip("triton")


CASES = [((1,), 0.1, 0, 0), ((7, 1537), 0.1, 3, 12345), ((3, 5, 333), 0.5, 99, -7), ((70001,), 0.25, 223, 2**31 - 1),
         ((1029,), 0.75, 5, 77)]  # p > 0.5: the threshold no longer fits an int32


def compare(device: str) -> list[bool]:
    """For every case: kernel output == reference output (float32, and bfloat16 on CUDA)."""
    out = []
    for shape, p, salt, seed in CASES:
        x = torch.randn(shape, device=device)
        s = torch.tensor([seed], dtype=torch.int32, device=device)
        dtypes = (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)
        for dt in dtypes:
            xd = x.to(dt)
            out.append(torch.equal(dk.seeded_dropout_triton(xd, s, salt, p), dk.seeded_dropout_ref(xd, s, salt, p)))
    return out


def test_kernel_equals_reference(run_interpreted):
    """Awkward sizes (1, not multiples of the 1024 block), negative and large seeds: bit-equal masks."""
    if torch.cuda.is_available():
        assert all(compare("cuda"))
    else:
        assert all(run_interpreted(__file__))


def test_mask_statistics():
    n, p = 200_000, 0.1
    seed = torch.tensor([5], dtype=torch.int32)
    a = dk.keep_mask_ref(n, seed, 0, p)
    b = dk.keep_mask_ref(n, seed, 1, p)
    c = dk.keep_mask_ref(n, torch.tensor([6], dtype=torch.int32), 0, p)
    for m in (a, b, c):
        assert abs((~m).float().mean().item() - p) < 0.005
    for other in (b, c):  # independent: both dropped about p^2 of the time
        assert abs((~a & ~other).float().mean().item() - p * p) < 0.003
    assert torch.equal(a, dk.keep_mask_ref(n, seed, 0, p))  # same seed, same mask
    # neighbouring elements are not correlated
    assert abs((~a[1:] & ~a[:-1]).float().mean().item() - p * p) < 0.003


def test_backward_uses_the_forward_mask():
    x = torch.randn(4, 300, requires_grad=True)
    seed = torch.tensor([17], dtype=torch.int32)
    y = dk.seeded_dropout(x, seed, 2, 0.3)
    y.backward(torch.ones_like(y))
    keep = y != 0
    assert torch.equal(x.grad != 0, keep)
    torch.testing.assert_close(x.grad[keep], torch.full_like(x.grad[keep], 1 / 0.7))
    assert dk.seeded_dropout(x, seed, 2, 0.0) is x


if __name__ == "__main__":  # run by test_kernel_equals_reference under TRITON_INTERPRET=1
    print(json.dumps(compare("cpu")))
