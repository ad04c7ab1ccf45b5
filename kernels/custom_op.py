"""The kernels' entry points as torch custom ops for torch.compile, called directly everywhere else.

torch.compile (the training step's `dynamo_backend`, a compiled model) must see each Triton launch as one opaque
call, so the entry points are registered with torch.library.custom_op. But calling any custom op eagerly runs it
inside torch._disable_dynamo, which imports torch._dynamo at the process's first such call: ~1.5 s of imports
(sympy and torch.distributed among them) that sample.py paid in its first decode step, or, imported in a thread
while the model loads, in a slower load (the import holds the GIL the loader needs). Outside torch.compile the op
adds nothing (a CUDA graph captures the launch either way), so `custom_op` returns a function that calls the plain
implementation unless torch.compile is tracing, and the registered op when it is.
"""
from __future__ import annotations

import functools

import torch


def custom_op(name: str, mutates_args=()):
    """Decorator like torch.library.custom_op(name, mutates_args=...). The result calls the plain function outside
    torch.compile and the op inside it; its `.op` is the registered op (for `register_fake`)."""
    def wrap(fn):
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return op(*args, **kwargs) if torch.compiler.is_compiling() else fn(*args, **kwargs)

        call.op = op
        return call
    return wrap
