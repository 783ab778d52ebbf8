"""Evaluation metrics. Segmentation quality: the adjusted Rand index (ARI) between two
labelings of each image.

``foreground_ari`` is the object-centric literature's FG-ARI: pixels whose true label is the
background are left out, so a model is not rewarded for splitting the background. It lives in
the runtime (not beside the slot world models) because evaluating a checkpoint
(``runtime.run.evaluate``) scores any agent with a ``segment`` method against an env's masks.
"""

from __future__ import annotations

import numpy as np


def _pairs(counts: np.ndarray) -> np.ndarray:
    counts = counts.astype(np.float64)
    return counts * (counts - 1.0) / 2.0


def adjusted_rand_index(
    true_labels: np.ndarray, pred_labels: np.ndarray, ignore_label: int | None = None
) -> np.ndarray:
    """ARI of each row: ``true_labels``, ``pred_labels`` int ``[N, P]`` (P pixels per image).

    Pixels whose true label equals ``ignore_label`` are left out. The index is 1 for identical
    partitions (whatever the label names), about 0 for unrelated ones; a row whose partitions
    are both trivial in the same way (one cluster each) scores 1, as in scikit-learn. Rows with
    fewer than 2 pixels left are ``nan``.

    Shapes: ``[N, P]`` -> ``[N]`` float64.
    """
    true_labels = np.asarray(true_labels)
    pred_labels = np.asarray(pred_labels)
    if true_labels.shape != pred_labels.shape or true_labels.ndim != 2:
        raise ValueError(
            f"adjusted_rand_index: expected two [N, P] label arrays of the same shape, got "
            f"{true_labels.shape} and {pred_labels.shape}"
        )
    out = np.full(true_labels.shape[0], np.nan)
    for i, (t, p) in enumerate(zip(true_labels, pred_labels)):
        if ignore_label is not None:
            keep = t != ignore_label
            t, p = t[keep], p[keep]
        n = t.size
        if n < 2:
            continue
        _, t_idx = np.unique(t, return_inverse=True)
        _, p_idx = np.unique(p, return_inverse=True)
        table = np.zeros((t_idx.max() + 1, p_idx.max() + 1), dtype=np.int64)
        np.add.at(table, (t_idx, p_idx), 1)
        index = _pairs(table).sum()
        rows = _pairs(table.sum(1)).sum()
        cols = _pairs(table.sum(0)).sum()
        expected = rows * cols / _pairs(np.array(n))
        maximum = 0.5 * (rows + cols)
        denominator = maximum - expected
        out[i] = 1.0 if denominator == 0 else (index - expected) / denominator
    return out


def foreground_ari(true_masks: np.ndarray, pred_masks: np.ndarray, background: int = 0) -> float:
    """Mean FG-ARI over images: ``true_masks`` int ``[N, H, W]`` (``background`` = not an
    object), ``pred_masks`` int ``[N, H, W]`` (e.g. the argmax over slots). Images without 2
    foreground pixels are skipped; ``nan`` when none is left."""
    true_masks = np.asarray(true_masks)
    pred_masks = np.asarray(pred_masks)
    if true_masks.shape != pred_masks.shape or true_masks.ndim != 3:
        raise ValueError(
            f"foreground_ari: expected two [N, H, W] masks of the same shape, got "
            f"{true_masks.shape} and {pred_masks.shape}"
        )
    n = true_masks.shape[0]
    scores = adjusted_rand_index(
        true_masks.reshape(n, -1), pred_masks.reshape(n, -1), ignore_label=background
    )
    scores = scores[~np.isnan(scores)]
    return float(scores.mean()) if scores.size else float("nan")


__all__ = ["adjusted_rand_index", "foreground_ari"]
