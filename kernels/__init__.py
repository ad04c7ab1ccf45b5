"""Triton kernels for CUDA, each beside the plain-torch reference it is tested against (and that runs off CUDA).

What they keep between calls in a process, all of it rebuilt on demand:
- `gemv._best`: the tile picked per matmul shape (timed once; also kept on disk, `gemv.cache_file()`);
- `int8_matmul.CACHE`: the int8 kernels' autotuned configs, compiled launches and per-shape decode choice (the
  configs and choices also kept on disk, in the same file as gemv's tiles);
- `counters._buffers`: one zeroed int32 ticket-counter buffer per device;
- Triton's own compiled kernels (on disk, Triton's cache).
Environment switches are read when used; `switches.py` lists them all.
"""
