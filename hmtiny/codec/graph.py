"""Replay the estimator as one CUDA graph.

One estimator call is thousands of small kernel launches (30 blocks of norms, modulation, RoPE, matmuls); in
eager mode the host issuing them is slower than the GPU running them. A graph captured once per (shape, dtype,
weights) replays them with one launch.
"""
from __future__ import annotations

import torch


class GraphedEstimator:
    """Callable like the estimator for one input shape; the returned tensor is overwritten by the next call."""

    def __init__(self, estimator, shape: tuple[int, ...], device):
        self.shape = tuple(shape)
        self.x = torch.zeros(shape, device=device)
        self.t = torch.zeros(shape[0], device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up outside the graph: cuBLAS handles, RoPE tables, autotuning
            for _ in range(2):
                estimator(self.x, self.t)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = estimator(self.x, self.t)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.t.copy_(t)
        self.graph.replay()
        return self.out
