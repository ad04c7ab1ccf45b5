"""`report_to`: the training metrics and validation clips, also sent to TensorBoard or Weights & Biases.

metrics.jsonl and loss.svg are always written; a tracker is an extra view. The packages are optional and imported
only when asked for; a missing one is a note, not an error (SimpleTuner configs often say `report_to: wandb`).

    report_to: none | tensorboard | wandb | all       (SimpleTuner's key and values)
    logging_dir: TensorBoard's folder, relative to output_dir (default "logs")
    tracker_project_name / tracker_run_name: the W&B project and run names
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

SCALARS = ("loss", "loss_c0", "loss_rest", "lr", "grad_norm", "frames_per_s")  # keys of a metrics.jsonl record
TRACKERS = ("tensorboard", "wandb")


class TensorBoard:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        self.writer = SummaryWriter(log_dir=str(folder))

    def scalars(self, values: dict, step: int):
        for key, value in values.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()

    def audio(self, name: str, path: Path, step: int):
        import soundfile as sf
        import torch
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        self.writer.add_audio(f"validation/{name}", torch.from_numpy(data.mean(axis=1))[None], step,
                              sample_rate=rate)  # TensorBoard plays mono: the channels' mean
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    def __init__(self, project: str, run_name: str | None, config: dict, folder: Path):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=project, name=run_name, config=config, dir=str(folder))

    def scalars(self, values: dict, step: int):
        self.run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def audio(self, name: str, path: Path, step: int):
        self.run.log({f"validation/{name}": self.wandb.Audio(str(path), caption=name)}, step=step)

    def close(self):
        self.run.finish()


class Trackers:
    """The trackers `report_to` asks for and can have; log()/audio() reach each of them."""

    def __init__(self, cfg, log: Callable[[str], None] = print):
        wanted = [t.strip().lower() for t in str(cfg.report_to or "none").split(",") if t.strip()]
        if "all" in wanted:
            wanted = list(TRACKERS)
        out = Path(cfg.output_dir)
        self.active = []
        for name in wanted:
            if name == "none":
                continue
            if name not in TRACKERS:
                log(f"note: report_to {name!r} is not supported here (use {' or '.join(TRACKERS)}); the metrics "
                    f"are in {out / 'metrics.jsonl'}")
                continue
            try:
                if name == "tensorboard":
                    self.active.append(TensorBoard(out / (cfg.logging_dir or "logs")))
                else:
                    self.active.append(WandB(cfg.tracker_project_name or "hmtiny", cfg.tracker_run_name,
                                             cfg.to_dict(), out))
            except ImportError as e:
                package = "tensorboard" if name == "tensorboard" else "wandb"
                log(f"note: report_to {name!r} needs the {package} package ({e}): `pip install {package}`; "
                    f"until then the metrics are in {out / 'metrics.jsonl'} and {out / 'loss.svg'}")
                continue
            log(f"reporting to {name}" + (f" ({out / (cfg.logging_dir or 'logs')})" if name == "tensorboard" else ""))

    def log(self, record: dict):
        values = {k: record[k] for k in SCALARS if k in record}
        for t in self.active:
            t.scalars(values, record["step"])

    def audio(self, paths, step: int):
        """Validation clips as written (audio files; .npy token files are skipped)."""
        for path in paths or []:
            path = Path(path)
            if path.suffix != ".npy":
                for t in self.active:
                    t.audio(path.stem, path, step)

    def close(self):
        for t in self.active:
            t.close()
        self.active = []
