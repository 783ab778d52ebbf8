"""Checkpoints: atomic, verified, never unpickling arbitrary objects.

A run keeps its checkpoints under ``<run>/checkpoints/step_<N>/`` (``N`` = env steps)::

    manifest.json          format_version, step, config, package versions, UTC time and
                           {bytes, sha256} of every other file
    weights.safetensors    agent_state["weights"] (flat dict of tensors)
    train_state.pt         {"agent": agent_state without "weights", "train": train_state},
                           loadable with torch.load(weights_only=True)
    replay.npz             SequenceReplay.save(); full replay chunks live in <run>/replay/

``checkpoints/latest`` names the newest directory. Each checkpoint is built in a temp directory
beside the others and renamed into place, so a crash leaves either the old or the new one.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from imagine_rl.runtime.config import to_dict
from imagine_rl.runtime.replay import SequenceReplay

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
TRAIN_STATE = "train_state.pt"
REPLAY = "replay.npz"
LATEST = "latest"
# train_state key of a weights-only checkpoint (save_weights).
WEIGHTS_ONLY = "weights_only"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_PACKAGES = ("torch", "numpy", "gymnasium", "mujoco", "dm-control", "imagine-rl")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or from a newer imagine-rl."""


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint; ``agent_state`` is what ``Agent.load_state_dict`` takes."""

    path: Path
    step: int
    config: dict[str, Any]
    manifest: dict[str, Any]
    agent_state: dict[str, Any]
    train_state: dict[str, Any]
    replay_path: Path | None


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _checkpoints_dir(run_dir: str | Path) -> Path:
    """``<run>/checkpoints`` for a run dir; the dir itself if it already is one."""
    path = Path(run_dir)
    if path.name == "checkpoints" or (path / LATEST).is_file():
        return path
    return path / "checkpoints"


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The ``step_<N>`` directories of a run (or of its ``checkpoints`` dir), by step."""
    root = _checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=lambda p: _step_of(p) or 0)


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _file_entry(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _flat_weights(weights: Any) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies: safetensors refuses views of shared storage."""
    if not isinstance(weights, dict):
        raise CheckpointError(
            f"agent_state['weights'] is {type(weights).__name__}; it must be a flat dict of tensors"
        )
    out = {}
    for name, tensor in weights.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"agent_state['weights'][{name!r}] is {type(tensor).__name__}; weights must be a "
                "flat dict of str -> Tensor (put other state in other agent_state keys)"
            )
        out[name] = tensor.detach().cpu().clone(memory_format=torch.contiguous_format)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(root: Path) -> None:
    """Temp dirs left by a crashed save (its pid gone) would otherwise pile up."""
    for path in root.glob(".*-step_*-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    config: dict[str, Any],
    agent_state: dict[str, Any],
    train_state: dict[str, Any],
    replay: SequenceReplay | None = None,
    keep: int = 3,
) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>/`` atomically, point ``latest`` at it and
    delete all but the ``keep`` newest checkpoints (never this one). Returns its path.

    ``agent_state["weights"]`` goes to safetensors; every other key of ``agent_state`` and all
    of ``train_state`` must load with ``torch.load(weights_only=True)``, checked here.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 checkpoints, got {keep}")
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = to_dict(config)
    if "weights" not in agent_state:
        raise CheckpointError("agent_state has no 'weights' key; see agents/base.py")
    root = _checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    name = f"step_{int(step)}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = {WEIGHTS: _write_bytes(tmp / WEIGHTS, _weights_bytes(agent_state["weights"]))}
        rest = {k: v for k, v in agent_state.items() if k != "weights"}
        files[TRAIN_STATE] = _write_bytes(tmp / TRAIN_STATE, _train_bytes(rest, train_state))
        if replay is not None:
            replay.save(tmp / REPLAY)  # fsyncs the file and the chunks it relies on
            files[REPLAY] = _file_entry(tmp / REPLAY)
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "versions": _package_versions(),
            "config": config,
            "files": files,
        }
        try:
            text = json.dumps(manifest, indent=2)
        except TypeError as e:
            raise CheckpointError(
                f"config is not JSON-serializable ({e}); pass to_dict(config)"
            ) from e
        _write_bytes(tmp / MANIFEST, text.encode())
        _fsync(tmp)
        if final.exists():
            # A directory cannot be renamed over a non-empty one: move the old aside first.
            old = root / f".old-{name}-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    latest_tmp = root / f".{LATEST}-{os.getpid()}"
    _write_bytes(latest_tmp, f"{name}\n".encode())
    os.replace(latest_tmp, root / LATEST)
    _fsync(root)

    # Keep this one and the keep - 1 highest others (a resumed run may save a lower step).
    others = [p for p in list_checkpoints(root) if p != final]
    for path in others[: max(0, len(others) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def save_weights(run_dir: str | Path, config: Any, agent_state: dict[str, Any]) -> Path:
    """A weights-only checkpoint (``<run_dir>/checkpoints/step_0``) of an agent trained outside
    ``train.py`` (e.g. by a research script): ``train.py init=<run_dir>`` and ``evaluate.py``
    accept it; ``resume=`` refuses it, as it holds no counters, RNG or replay to continue.

    ``agent_state`` is ``agent.state_dict()``; only its ``weights`` are kept.
    """
    if "weights" not in agent_state:
        raise CheckpointError("agent_state has no 'weights' key; see agents/base.py")
    return save_checkpoint(
        run_dir, 0, config, {"weights": agent_state["weights"]}, {WEIGHTS_ONLY: True}
    )


def is_weights_only(checkpoint: LoadedCheckpoint) -> bool:
    """Whether ``checkpoint`` was written by ``save_weights`` (no training state)."""
    return bool(checkpoint.train_state.get(WEIGHTS_ONLY))


def _weights_bytes(weights: Any) -> bytes:
    return safetensors.torch.save(_flat_weights(weights))


def _train_bytes(agent_rest: dict[str, Any], train_state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save({"agent": agent_rest, "train": train_state}, buffer)
    data = buffer.getvalue()
    # Catch contract violations now, not at resume time when the run is gone.
    try:
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointError(
            "agent/train state does not load with torch.load(weights_only=True); keep only "
            f"tensors, numbers, strings, lists and dicts (convert numpy arrays to tensors): {e}"
        ) from e
    return data


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _read_manifest(ckpt: Path) -> dict[str, Any]:
    path = ckpt / MANIFEST
    if not path.is_file():
        raise _corrupt(ckpt, MANIFEST, "is missing (an incomplete save, or not a checkpoint)")
    try:
        manifest = json.loads(path.read_text())
        version = int(manifest["format_version"])
        int(manifest["step"])
        if not isinstance(manifest["files"], dict) or not isinstance(manifest["config"], dict):
            raise TypeError("'files' and 'config' must be mappings")
    except Exception as e:
        raise _corrupt(ckpt, MANIFEST, f"is not a valid manifest ({type(e).__name__}: {e})") from e
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt} has format_version {version}: written by a newer imagine-rl (this one reads "
            f"up to {FORMAT_VERSION}); upgrade imagine-rl to load it"
        )
    return manifest


def _has_valid_manifest(ckpt: Path) -> bool:
    try:
        _read_manifest(ckpt)
    except CheckpointError:
        return False
    return True


def _resolve(path: str | Path) -> Path:
    """A checkpoint dir from a checkpoint dir, a run dir or a ``checkpoints`` dir."""
    path = Path(path)
    hint = "runs keep them under <run>/checkpoints/step_<N>"
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; {hint}")
    if (path / MANIFEST).exists() or _step_of(path) is not None:
        return path
    root = _checkpoints_dir(path)
    latest = root / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if _STEP_DIR.match(name) and _has_valid_manifest(root / name):
            return root / name
    # `latest` missing or stale (e.g. a crash between rename and update): newest valid one.
    for candidate in reversed(list_checkpoints(root)):
        if _has_valid_manifest(candidate):
            if latest.is_file():
                warnings.warn(
                    f"{latest} names no valid checkpoint; using {candidate.name}", stacklevel=3
                )
            return candidate
    raise CheckpointError(f"no checkpoint at {path}; {hint}")


def _corrupt(ckpt: Path, file: str, problem: str) -> CheckpointError:
    others = [p.name for p in list_checkpoints(ckpt.parent) if p != ckpt]
    listed = ", ".join(others) if others else "none"
    return CheckpointError(
        f"checkpoint {ckpt} is corrupt: {file} {problem}; other checkpoints in "
        f"{ckpt.parent}: {listed} (pass one of them to resume)"
    )


def _verified_bytes(ckpt: Path, name: str, entry: Any, read: bool) -> bytes | None:
    """Check one manifest entry's size and sha256; returns the bytes when ``read``."""
    if (
        not isinstance(name, str)
        or "/" in name
        or "\\" in name
        or name in ("", ".", "..")
        or not isinstance(entry, dict)
    ):
        raise _corrupt(ckpt, MANIFEST, f"lists an invalid file entry {name!r}")
    path = ckpt / name
    if not path.is_file():
        raise _corrupt(ckpt, name, "is missing")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise _corrupt(ckpt, name, f"has {size} bytes, the manifest says {entry.get('bytes')}")
    digest = hashlib.sha256()
    data = path.read_bytes() if read else None
    if data is not None:
        digest.update(data)
    else:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    if digest.hexdigest() != entry.get("sha256"):
        raise _corrupt(ckpt, name, "does not match its sha256 in the manifest (tampered?)")
    return data


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Load and verify a checkpoint: ``path`` is a ``step_<N>`` dir, a run dir (follows
    ``checkpoints/latest``, else the newest valid one) or a ``checkpoints`` dir.

    Raises ``CheckpointError`` when it is missing, corrupt, tampered with, would need to
    unpickle arbitrary objects, or was written by a newer imagine-rl.
    """
    ckpt = _resolve(path)
    manifest = _read_manifest(ckpt)
    files = manifest["files"]
    for required in (WEIGHTS, TRAIN_STATE):
        if required not in files:
            raise _corrupt(ckpt, MANIFEST, f"does not list {required}")
    blobs = {
        name: _verified_bytes(ckpt, name, entry, read=name in (WEIGHTS, TRAIN_STATE))
        for name, entry in files.items()
    }
    try:
        weights = safetensors.torch.load(blobs[WEIGHTS])
    except Exception as e:
        raise _corrupt(ckpt, WEIGHTS, f"is not valid safetensors ({e})") from e
    try:
        # weights_only: the unpickler refuses any global outside torch's allowlist, so a
        # crafted payload (a __reduce__ calling os.system, ...) raises instead of running.
        state = torch.load(io.BytesIO(blobs[TRAIN_STATE]), weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {ckpt}: {TRAIN_STATE} refused by torch.load(weights_only=True) "
            f"({type(e).__name__}); it holds objects other than tensors/numbers/strings/"
            "containers and was not written by save_checkpoint; not loading it"
        ) from e
    if not isinstance(state, dict) or not {"agent", "train"} <= set(state):
        raise _corrupt(ckpt, TRAIN_STATE, "lacks the 'agent' and 'train' entries")
    agent_state = dict(state["agent"])
    agent_state["weights"] = weights
    return LoadedCheckpoint(
        path=ckpt,
        step=int(manifest["step"]),
        config=manifest["config"],
        manifest=manifest,
        agent_state=agent_state,
        train_state=state["train"],
        replay_path=ckpt / REPLAY if REPLAY in files else None,
    )
