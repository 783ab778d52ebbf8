"""A small logger with backends: console progress, ``metrics.jsonl`` (always), wandb, TensorBoard.

Metric keys are namespaced: ``train/``, ``eval/``, ``loss/``, ``world_model/``, ``sparse/``,
``perf/``. wandb and TensorBoard are imported only when their backend is built.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import yaml

from imagine_rl.runtime.config import Config, to_dict

NAMESPACES = ("train/", "eval/", "loss/", "world_model/", "sparse/", "perf/")


def check_key(key: str) -> None:
    if not key.startswith(NAMESPACES):
        raise ValueError(
            f"metric '{key}' has no namespace: prefix it with one of {', '.join(NAMESPACES)}"
        )


def write_video(path: str | Path, frames: np.ndarray, fps: int) -> Path:
    """Write ``frames`` (uint8 ``[T, H, W, 3]``) as mp4 (gif if ffmpeg is unavailable).

    Returns the path written. Dimensions are padded to even sizes, as H.264 needs.
    """
    import imageio.v2 as imageio

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"video frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}"
        )
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # macro_block_size=1 keeps 64x64 frames as they are instead of resizing to 16-multiples.
        imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1, codec="libx264")
    except Exception as error:  # noqa: BLE001 - no ffmpeg: fall back to a gif, never lose the video
        path = path.with_suffix(".gif")
        warnings.warn(f"mp4 writing failed ({error}); wrote {path} instead", stacklevel=2)
        imageio.mimwrite(path, list(frames), duration=1000 / fps, loop=0)
    return path


def write_image(path: str | Path, image: np.ndarray) -> Path:
    """Write ``image`` (uint8 ``[H, W, 3]``) as a PNG; returns the path."""
    import imageio.v2 as imageio

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(path, image, format="png")
    return path


class Backend(Protocol):
    def write(self, metrics: dict[str, float], step: int) -> None: ...

    def video(self, name: str, path: Path, step: int, fps: int) -> None: ...

    def image(self, name: str, path: Path, step: int) -> None: ...

    def close(self) -> None: ...


def drop_rows_after(path: Path, step: int) -> int:
    """Remove the rows of a ``metrics.jsonl`` logged after env step ``step`` (and lines cut by
    a crash), atomically; returns how many were dropped. A run resumed from the checkpoint at
    ``step`` logs those steps again, so every step appears once."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if row_step > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


class JsonlBackend:
    """Appends one JSON object per call to ``metrics.jsonl``: ``{"step": N, "key": value, ...}``.

    ``resume_step``: the env step of the checkpoint a resumed run continues from; rows logged
    after it (by the killed session) are dropped first (``drop_rows_after``)."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            dropped = drop_rows_after(self.path, resume_step)
            if dropped:
                warnings.warn(
                    f"{self.path}: dropped {dropped} rows logged after the checkpoint at env "
                    f"step {resume_step} (the run stopped after it); they are logged again",
                    stacklevel=2,
                )
        self.file = self.path.open("a", encoding="utf-8")

    def write(self, metrics: dict[str, float], step: int) -> None:
        # JSON has no NaN/inf: write them as null so every line stays valid JSON.
        clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()

    def video(self, name: str, path: Path, step: int, fps: int) -> None:
        self.file.write(json.dumps({"step": step, f"{name}_path": str(path)}) + "\n")
        self.file.flush()

    def image(self, name: str, path: Path, step: int) -> None:
        self.video(name, path, step, 0)

    def close(self) -> None:
        self.file.close()


class ConsoleBackend:
    """A live progress line (step, fps, ETA, latest returns); one line per write when not a TTY."""

    def __init__(self, total_steps: int, stream: Any = None, min_interval: float = 0.5) -> None:
        self.total = total_steps
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.min_interval = min_interval
        self.start_time = time.time()
        self.start_step: int | None = None
        self.last_draw = 0.0
        self.latest: dict[str, float] = {}

    def _line(self, step: int) -> str:
        if self.start_step is None:
            self.start_step = step
        elapsed = max(time.time() - self.start_time, 1e-6)
        fps = (step - self.start_step) / elapsed
        remaining = (self.total - step) / fps if fps > 0 else float("inf")
        eta = time.strftime("%H:%M:%S", time.gmtime(remaining)) if math.isfinite(remaining) else "?"
        done = min(step / max(self.total, 1), 1.0)
        bar = "#" * int(done * 20) + "-" * (20 - int(done * 20))
        parts = [f"[{bar}] {step}/{self.total}", f"{fps:.0f} steps/s", f"eta {eta}"]
        for key, label in (("train/episode_return", "return"), ("eval/return_mean", "eval")):
            if key in self.latest:
                parts.append(f"{label} {self.latest[key]:.1f}")
        return " | ".join(parts)

    def progress(self, step: int) -> None:
        """Redraw the live line (throttled); a no-op when not attached to a terminal."""
        now = time.time()
        if self.tty and now - self.last_draw >= self.min_interval:
            self.last_draw = now
            self.stream.write("\r" + self._line(step).ljust(100))
            self.stream.flush()

    def write(self, metrics: dict[str, float], step: int) -> None:
        self.latest.update({k: v for k, v in metrics.items() if math.isfinite(v)})
        if self.tty:
            self.last_draw = 0.0
            self.progress(step)
        else:
            self.stream.write(self._line(step) + "\n")
            self.stream.flush()

    def video(self, name: str, path: Path, step: int, fps: int) -> None:
        pass

    def image(self, name: str, path: Path, step: int) -> None:
        pass

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class WandbBackend:
    """Weights & Biases: offline by default (never blocks); resumes the same run id on resume.

    No API key is passed or stored by us: wandb reads its own credentials (``wandb login``).
    """

    def __init__(self, config: Config, run_dir: str | Path, run_id: str | None = None) -> None:
        # wandb's Weave integration looks for LLM libraries by module name and takes our
        # top-level package `agents` for OpenAI's, printing "Detected [agents] in use ... W&B
        # Weave" at every run; we log no LLM calls, so turn the detection off (unless set).
        os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")
        import wandb

        self.wandb = wandb
        settings = wandb.Settings(init_timeout=60, console="off", silent=True)
        kwargs = dict(
            project=config.logging.project,
            entity=config.logging.entity,
            group=config.logging.group,
            name=config.logging.name,
            tags=config.logging.tags or None,
            config=to_dict(config),
            dir=str(run_dir),
            id=run_id,
            resume="allow" if run_id else None,
            settings=settings,
        )
        try:
            self.run = wandb.init(mode=config.logging.mode, **kwargs)
        except Exception as error:  # noqa: BLE001 - online failure must not stop training
            if config.logging.mode != "online":
                raise
            warnings.warn(
                f"wandb online init failed ({error}); logging offline instead "
                f"(sync later with `wandb sync {run_dir}/wandb`)",
                stacklevel=2,
            )
            self.run = wandb.init(mode="offline", **kwargs)
        self.run_id = self.run.id
        # The run config also lives in the .wandb records; a readable copy sits beside the
        # media so an offline run directory is self-describing before any sync.
        files_dir = Path(self.run.dir)
        files_dir.mkdir(parents=True, exist_ok=True)
        (files_dir / "imagine_rl_config.yaml").write_text(
            yaml.safe_dump(to_dict(config), sort_keys=False)
        )

    def write(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def video(self, name: str, path: Path, step: int, fps: int) -> None:
        fmt = path.suffix.lstrip(".")
        self.run.log({name: self.wandb.Video(str(path), format=fmt)}, step=step)

    def image(self, name: str, path: Path, step: int) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardBackend:
    def __init__(self, run_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "logging.tensorboard=true needs the tensorboard package: "
                "pip install 'imagine-rl[tensorboard]'"
            ) from error
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def video(self, name: str, path: Path, step: int, fps: int) -> None:
        pass

    def image(self, name: str, path: Path, step: int) -> None:
        import imageio.v2 as imageio

        self.writer.add_image(name, imageio.imread(path), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class Logger:
    """Fans metrics and videos out to backends. Keys must carry a namespace (see ``NAMESPACES``)."""

    def __init__(self, run_dir: str | Path, backends: list[Backend], video_fps: int = 20) -> None:
        self.run_dir = Path(run_dir)
        self.backends = backends
        self.video_fps = video_fps

    @property
    def console(self) -> ConsoleBackend | None:
        return next((b for b in self.backends if isinstance(b, ConsoleBackend)), None)

    @property
    def wandb_run_id(self) -> str | None:
        backend = next((b for b in self.backends if isinstance(b, WandbBackend)), None)
        return backend.run_id if backend else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {}
        for key, value in metrics.items():
            check_key(key)
            clean[key] = float(value)
        if clean:
            for backend in self.backends:
                backend.write(clean, step)

    def video(self, name: str, frames: np.ndarray, step: int) -> Path:
        """Write ``frames`` (uint8 ``[T, H, W, 3]``) under ``videos/`` and log it everywhere."""
        check_key(name)
        filename = name.replace("/", "_") + f"_{step}.mp4"
        path = write_video(self.run_dir / "videos" / filename, frames, self.video_fps)
        for backend in self.backends:
            backend.video(name, path, step, self.video_fps)
        return path

    def image(self, name: str, image: np.ndarray, step: int) -> Path:
        """Write ``image`` (uint8 ``[H, W, 3]``) under ``images/`` and log it everywhere."""
        check_key(name)
        filename = name.replace("/", "_") + f"_{step}.png"
        path = write_image(self.run_dir / "images" / filename, image)
        for backend in self.backends:
            backend.image(name, path, step)
        return path

    def media(self, name: str, media: np.ndarray, step: int) -> Path:
        """``image`` for ``[H, W, 3]`` arrays, ``video`` for ``[T, H, W, 3]``."""
        if np.ndim(media) == 3:
            return self.image(name, media, step)
        return self.video(name, media, step)

    def progress(self, step: int) -> None:
        console = self.console
        if console is not None:
            console.progress(step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def make_logger(
    config: Config,
    run_dir: str | Path,
    wandb_run_id: str | None = None,
    resume_step: int | None = None,
) -> Logger:
    """Backends from ``config.logging``; ``metrics.jsonl`` is always on. ``resume_step``: a
    resumed run's checkpoint step (rows logged after it are dropped, see ``JsonlBackend``)."""
    os.makedirs(run_dir, exist_ok=True)
    backends: list[Backend] = [JsonlBackend(run_dir, resume_step=resume_step)]
    if config.logging.console:
        backends.append(ConsoleBackend(config.run.steps))
    if config.logging.wandb and config.logging.mode != "disabled":
        backends.append(WandbBackend(config, run_dir, run_id=wandb_run_id))
    if config.logging.tensorboard:
        backends.append(TensorBoardBackend(run_dir))
    return Logger(run_dir, backends, video_fps=config.logging.video_fps)
