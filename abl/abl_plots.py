"""Pictures of an ABL isolation: the loss histogram at T_te and a grid of the isolated training images.

matplotlib (Agg, no display) is imported lazily so that training never needs a GUI backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def loss_histogram_png(path: str | Path, losses: np.ndarray, pool: np.ndarray, isolated: np.ndarray,
                       poison_indices: np.ndarray | None = None, bins: int = 60,
                       scores: np.ndarray | None = None) -> None:
    """Histogram of per-example losses at T_te on a log axis: poisoned vs clean when the ground truth is known,
    otherwise all examples; the isolation cutoff is drawn as a vertical line.

    ``scores`` (natural-log class-relative scores, see ``abl_guard.abl.isolation.isolation_scores``) are plotted
    instead of the losses when the isolation ranked them, in decades relative to the median loss of each example's
    label.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vals = np.asarray(losses, np.float64)[pool]
    floor = 1e-8
    if scores is not None:
        logv = np.asarray(scores, np.float64)[pool] / np.log(10.0)
        cutoff = float(np.max(np.asarray(scores, np.float64)[isolated]) / np.log(10.0))
        xlabel = "per-example log10 cross-entropy minus the median of its label, at the end of isolation"
    else:
        logv = np.log10(np.maximum(vals, floor))
        cutoff = float(np.log10(max(float(np.max(np.asarray(losses)[isolated])), floor)))
        xlabel = "log10 per-example cross-entropy at the end of isolation (eval mode)"
    edges = np.linspace(logv.min(), max(logv.max(), logv.min() + 1e-6), bins + 1)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    if poison_indices is not None and len(poison_indices):
        is_poison = np.isin(pool, np.asarray(poison_indices))
        ax.hist(logv[~is_poison], bins=edges, alpha=0.6, label=f"clean ({int((~is_poison).sum())})", color="tab:blue")
        ax.hist(logv[is_poison], bins=edges, alpha=0.6, label=f"poisoned ({int(is_poison.sum())})", color="tab:red")
    else:
        ax.hist(logv, bins=edges, alpha=0.7, label=f"all ({len(vals)})", color="tab:gray")
    ax.axvline(cutoff, color="black", linestyle="--", linewidth=1, label=f"isolation cutoff ({len(isolated)} below)")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("examples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def isolated_grid_png(path: str | Path, images: np.ndarray, labels: np.ndarray, max_images: int = 100,
                      cols: int = 10) -> None:
    """The first ``max_images`` isolated images (lowest loss first) in a grid, each titled with its label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(len(images), max_images)
    cols = max(1, min(cols, k))
    rows = max(1, (k + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.25 * rows), dpi=100, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= k:
            continue
        img = images[i]
        if img.shape[2] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(img, interpolation="nearest")
        ax.set_title(str(int(labels[i])), fontsize=7, pad=1)
    fig.suptitle(f"ABL isolated training images (lowest loss first; {k} of {len(images)} shown)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
