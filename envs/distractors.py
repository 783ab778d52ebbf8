"""Background distractors for pixel tasks: a random video generated locally, no downloads.

Each episode draws a new video from the env's RNG: a drifting colour field (a few travelling
sine waves per channel, low spatial frequency, like out-of-focus scenery) with a handful of
coloured discs and squares moving across it and bouncing off the borders. ``composite`` puts it
behind the task: wherever the MuJoCo segmentation shows the skybox or a plane (the floor), so
the agent and everything it interacts with stay untouched. The distraction is irrelevant to the
task but carries most of the pixel variance, which is what a reconstruction loss spends its
capacity on (Zhang et al. 2021 use natural videos; here they are synthetic so every run can
generate them).
"""

from __future__ import annotations

import numpy as np


class DistractorVideo:
    """A random background video, one frame per env step.

    Shapes:
        ``frame()`` -> uint8 (size, size, 3)
    """

    def __init__(self, size: int, rng: np.random.Generator, shapes: int = 4, waves: int = 3):
        self.size = size
        grid = np.arange(size, dtype=np.float32) / size
        self._y, self._x = np.meshgrid(grid, grid, indexing="ij")
        # Travelling waves per channel: spatial frequency (cycles across the frame), phase,
        # phase speed per step.
        self._freq = rng.uniform(-2.5, 2.5, (3, waves, 2)).astype(np.float32) * 2 * np.pi
        self._phase = rng.uniform(0, 2 * np.pi, (3, waves)).astype(np.float32)
        self._speed = rng.uniform(-0.25, 0.25, (3, waves)).astype(np.float32)
        self._base = rng.uniform(60, 190, 3).astype(np.float32)
        self._amp = rng.uniform(25, 60, 3).astype(np.float32) / waves
        # Moving shapes: position and velocity in pixels, radius, colour, disc or square.
        scale = size / 64
        self._pos = rng.uniform(0, size, (shapes, 2)).astype(np.float32)
        self._vel = (rng.uniform(0.7, 2.5, (shapes, 2)) * rng.choice([-1, 1], (shapes, 2))).astype(
            np.float32
        ) * scale
        self._radius = rng.uniform(4, 11, shapes).astype(np.float32) * scale
        self._colour = rng.uniform(0, 255, (shapes, 3)).astype(np.float32)
        self._disc = rng.random(shapes) < 0.5

    def step(self) -> None:
        """Advance one frame: waves travel, shapes move and bounce off the borders."""
        self._phase += self._speed
        self._pos += self._vel
        for axis in range(2):
            low = self._pos[:, axis] < 0
            high = self._pos[:, axis] > self.size
            self._vel[low | high, axis] *= -1
            self._pos[:, axis] = np.clip(self._pos[:, axis], 0, self.size)

    def frame(self) -> np.ndarray:
        """The current frame, uint8 (size, size, 3)."""
        # [3, waves, H, W] phases of every wave at every pixel.
        arg = (
            self._freq[..., 0, None, None] * self._x
            + self._freq[..., 1, None, None] * self._y
            + self._phase[..., None, None]
        )
        field = self._base[:, None, None] + (self._amp[:, None, None, None] * np.sin(arg)).sum(1)
        image = field.transpose(1, 2, 0)
        pixels_y, pixels_x = self._y * self.size, self._x * self.size
        for pos, radius, colour, disc in zip(self._pos, self._radius, self._colour, self._disc):
            dx, dy = pixels_x - pos[0], pixels_y - pos[1]
            if disc:
                inside = dx * dx + dy * dy <= radius * radius
            else:
                inside = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
            image[inside] = colour
        return np.clip(image, 0, 255).astype(np.uint8)


def composite(frame: np.ndarray, background: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``frame`` with ``background`` where ``mask`` is true.

    Shapes:
        frame, background: uint8 (H, W, 3); mask: bool (H, W) -> uint8 (H, W, 3)
    """
    assert frame.shape == background.shape and mask.shape == frame.shape[:2], (
        f"composite: frame {frame.shape}, background {background.shape}, mask {mask.shape}"
    )
    return np.where(mask[..., None], background, frame)


__all__ = ["DistractorVideo", "composite"]
