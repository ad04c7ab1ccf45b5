"""Reading safetensors files onto a CUDA device quickly: threads read the tensor bytes in chunks into a few reusable
pinned host buffers, and each chunk is copied to the GPU on a stream of its own while the next chunk is read.

Per tensor, safetensors' own reader copies it out of the page cache, then it is cast on the host and copied over a
pageable (synchronous) transfer: one thread, nothing overlapped. Here the disk or page-cache reads, several at a
time, overlap the host-to-device copies, and any cast runs on the GPU afterwards (hmtiny.checkpoint.load_weights).

The file format is simple and documented: an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range [begin, end) counted from the end of the header, then the bytes. The header is checked
against the file's size before anything is read, so a truncated file fails at once, naming the file.

Everything but the pinned memory, the side stream and its events runs the same way on the CPU (plain buffers,
synchronous copies): the tests compare that path bit for bit with safetensors' own load.
"""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import damaged

# safetensors dtype names; the unsigned wide ints and float8 only where this torch has them
DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"), ("U16", "uint16"),
    ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
    if hasattr(torch, attr)}

CHUNK_BYTES = 128 * 2**20
BUFFERS = 3
THREADS = 4
MIN_READ_BYTES = 4 * 2**20  # a chunk is split among the threads only in parts at least this large


@dataclass
class Entry:
    """One tensor of a file: its bytes are [begin, end) of the file (absolute offsets)."""
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class Chunk:
    """Bytes [begin, end) of a file, read in one go. pieces: (entry index, offset in the chunk, offset in the
    tensor, length); done: the entries whose last byte is in this chunk, in file order."""
    begin: int
    end: int
    pieces: list[tuple[int, int, int, int]]
    done: list[int]


def read_header(path: Path) -> list[Entry]:
    """The tensors of a safetensors file, in file order, every byte range checked against the file's size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise damaged(path, f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise damaged(path, f"the header is {n} bytes but the file has {size - 8} after the length")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise damaged(path, f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise damaged(path, "the header is not a JSON object")
    data_start = 8 + n
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        entries.append(_entry(path, key, info, data_start, size))
    entries.sort(key=lambda e: (e.begin, e.end))
    for a, b in zip(entries, entries[1:]):
        if b.begin < a.end:
            raise damaged(path, f"tensors {a.key} and {b.key} share bytes")
    return entries


def _entry(path: Path, key: str, info, data_start: int, size: int) -> Entry:
    try:
        dtype = DTYPES[info["dtype"]]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise damaged(path, f"tensor {key}: bad header entry {info!r} ({type(e).__name__}: {e})") from None
    nbytes = math.prod(shape) * dtype.itemsize
    if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes:
        raise damaged(path, f"tensor {key}: bytes [{begin}, {end}) do not hold {info['dtype']} of shape {shape}")
    if data_start + end > size:
        raise damaged(path, f"tensor {key} ends at byte {data_start + end} but the file has {size} bytes")
    return Entry(key, dtype, shape, data_start + begin, data_start + end)


def plan_chunks(entries: list[Entry], chunk_bytes: int) -> list[Chunk]:
    """Cut the span of the tensors' bytes (entries in file order) into consecutive chunks of at most chunk_bytes,
    each a list of pieces of tensors: a large tensor spans several chunks, a chunk may hold many small tensors.
    Tensors without bytes are in no chunk."""
    spans = [i for i, e in enumerate(entries) if e.end > e.begin]
    if not spans:
        return []
    chunks, first = [], 0
    hi = max(entries[i].end for i in spans)
    for begin in range(entries[spans[0]].begin, hi, chunk_bytes):
        end = min(begin + chunk_bytes, hi)
        while entries[spans[first]].end <= begin:  # tensors wholly before this chunk
            first += 1
        pieces, done = [], []
        for i in spans[first:]:
            e = entries[i]
            if e.begin >= end:
                break
            lo, top = max(e.begin, begin), min(e.end, end)
            pieces.append((i, lo - begin, lo - e.begin, top - lo))
            if e.end <= end:
                done.append(i)
        chunks.append(Chunk(begin, end, pieces, done))
    return chunks


def split_range(n: int, parts: int, min_bytes: int | None = None) -> list[tuple[int, int]]:
    """[0, n) as up to `parts` consecutive ranges of nearly equal size, none smaller than min_bytes (default
    MIN_READ_BYTES) unless there is only one."""
    parts = max(1, min(parts, n // max(1, min_bytes or MIN_READ_BYTES)))
    cuts = [n * k // parts for k in range(parts + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def read_exact(path: Path, offset: int, view: memoryview):
    """Fill `view` with the file's bytes from `offset` (its own file handle: safe beside other threads)."""
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise damaged(path, f"it ends at byte {offset + got}, before byte {offset + len(view)} "
                                    f"that its header promises")
            got += n


def read_chunk(path: Path, chunk: Chunk, view: memoryview, pool: ThreadPoolExecutor | None, threads: int):
    """The chunk's bytes into view[: its size], in `threads` parts read at once."""
    parts = split_range(chunk.end - chunk.begin, threads if pool is not None else 1)
    jobs = [(path, chunk.begin + a, view[a:b]) for a, b in parts]
    if len(jobs) == 1 or pool is None:
        for job in jobs:
            read_exact(*job)
        return
    for future in [pool.submit(read_exact, *job) for job in jobs]:
        future.result()


def stream_tensors(files: list[Path], device, chunk_bytes: int | None = None, buffers: int | None = None,
                   threads: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) for every tensor of the files, file by file (each file's tensors without bytes first,
    then the rest in byte order), each on `device` in its stored dtype.

    CUDA: the chunks are read into `buffers` pinned buffers in turn and copied on a side stream without waiting
    (non_blocking); a yielded tensor is complete for work queued on the current stream afterwards (that stream waits
    for its chunk's copies), so use it from the calling thread's current stream. Elsewhere the same chunks are read
    into plain buffers and copied synchronously. A buffer is reused only once its previous copies are done.
    None: the module's CHUNK_BYTES, BUFFERS, THREADS (read at the call, so a benchmark may set them)."""
    chunk_bytes, buffers, threads = chunk_bytes or CHUNK_BYTES, buffers or BUFFERS, threads or THREADS
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    headers = [(Path(f), read_header(f)) for f in files]  # every file checked before anything is read
    plans = [(path, entries, plan_chunks(entries, chunk_bytes)) for path, entries in headers]
    size = max((c.end - c.begin for _, _, chunks in plans for c in chunks), default=0)
    staging: list[torch.Tensor] = []
    copied: list[torch.cuda.Event | None] = [None] * buffers
    side = torch.cuda.Stream(device) if cuda else None
    n = 0
    pool = ThreadPoolExecutor(threads, thread_name_prefix="hmtiny-read") if threads > 1 else None
    try:
        for path, entries, chunks in plans:
            for e in entries:
                if e.end == e.begin:
                    yield e.key, torch.empty(e.shape, dtype=e.dtype, device=device)
            dest: dict[int, torch.Tensor] = {}
            for chunk in chunks:
                slot = n % buffers
                n += 1
                if slot == len(staging):  # allocated on first use: a small file pins little
                    staging.append(torch.empty(size, dtype=torch.uint8, pin_memory=cuda))
                if copied[slot] is not None:
                    copied[slot].synchronize()  # its last chunk's copies have left it
                buf = staging[slot]
                read_chunk(path, chunk, memoryview(buf.numpy()), pool, threads)
                for i, *_ in chunk.pieces:
                    if i not in dest:  # on the current stream: its freed memory is safe to reuse there
                        e = entries[i]
                        dest[i] = torch.empty(e.shape, dtype=e.dtype, device=device)
                bytes_of = {i: dest[i].view(-1).view(torch.uint8) for i, *_ in chunk.pieces}
                if cuda:
                    copied[slot] = _copy_on_side(side, chunk, buf, bytes_of)
                else:
                    for i, at, to, length in chunk.pieces:
                        bytes_of[i][to:to + length].copy_(buf[at:at + length])
                for i in chunk.done:
                    yield entries[i].key, dest.pop(i)
    finally:  # also when the caller stops early
        if pool is not None:
            pool.shutdown()
        if cuda:
            side.synchronize()  # nothing in flight from the staging buffers once they are freed


def _copy_on_side(side: torch.cuda.Stream, chunk: Chunk, buf: torch.Tensor, bytes_of: dict) -> torch.cuda.Event:
    """Queue the chunk's copies on `side` (into the byte views of the destinations), make the current stream wait
    for them, return their event."""
    current = torch.cuda.current_stream(side.device)
    side.wait_stream(current)  # a destination may reuse memory the current stream's queued work still reads
    with torch.cuda.stream(side):
        for i, at, to, length in chunk.pieces:
            bytes_of[i][to:to + length].copy_(buf[at:at + length], non_blocking=True)
        event = torch.cuda.Event()
        event.record(side)
    current.wait_event(event)
    return event

