"""Timing small kernels the way a generation frame runs them: many calls captured in one CUDA graph; and `capture`,
the warm-up-then-capture that the CUDA tests replay.

A host-timed loop of 5-50 µs kernels measures launch latency, not the kernels; inside a graph the launches cost
~1 µs each, as in the engine's captured frame step. Used by kernels.gemv's tile choice and the bench scripts.
"""
from __future__ import annotations

import torch


def capture(fn, warmup: int = 1):
    """(graph, fn()'s output): fn runs `warmup` times on a side stream first (Triton compiles, cuBLAS handles,
    allocations happen outside the capture), then once inside a new CUDA graph. Replaying the graph reruns fn on
    whatever its input tensors hold then, writing into the same output tensors."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graph_time(fn, calls: int, warmup: int = 3, replays: int = 5, stream: torch.cuda.Stream | None = None) -> float:
    """Seconds per call of fn(i), i = 0..calls-1, all captured in one CUDA graph (median over `replays`).
    The first `warmup` calls run outside the capture, on a side stream (Triton compiles, allocations).
    `stream`: warm up and capture on this one instead, e.g. for a backward alone: autograd runs a backward op on
    the stream its forward ran on, so the forward must have run on the capturing stream."""
    side = stream or torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(warmup):
            fn(i % calls)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            fn(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return sorted(times)[len(times) // 2]
