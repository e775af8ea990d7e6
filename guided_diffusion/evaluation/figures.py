"""
Pictures for people: coronal / sagittal maximum-intensity projections and slices of volumes,
and :func:`save_figure`, the one way a report's matplotlib figure is written (atomically).

Volumes are ``(X, Y, Z)`` arrays (Z axial, feet -> head) in SUV; the figures show Z upwards
(head at the top) with the true aspect ratio from the voxel size in mm.
"""

import numpy as np

from ..pet.volumes import atomic_write


def _views(volume):
    """Coronal MIP (over Y), sagittal MIP (over X) and the central coronal slice, as
    ``(horizontal, Z)`` images."""
    volume = np.asarray(volume, dtype=np.float32)
    return (
        volume.max(axis=1),
        volume.max(axis=0),
        volume[:, volume.shape[1] // 2, :],
    )


VIEW_TITLES = ("coronal MIP", "sagittal MIP", "coronal slice")


def save_volume_panels(path, panels, voxel_mm, title=None):
    """Write a PNG with one row per panel and three views per row.

    :param path: output ``.png`` (written atomically).
    :param panels: list of ``(label, volume (X, Y, Z), vmax or None, cmap)``; ``vmax=None``
        uses the 99.9th percentile of the volume.
    :param voxel_mm: voxel size ``(x, y, z)`` in mm (scalar for isotropic), for the aspect ratio.
    :param title: optional figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vx, vy, vz = np.broadcast_to(np.asarray(voxel_mm, dtype=float), (3,))
    rows = len(panels)
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3.6 * rows), squeeze=False)
    for row, (label, volume, vmax, cmap) in enumerate(panels):
        if vmax is None:
            vmax = float(np.percentile(volume, 99.9)) or 1.0
        for col, (image, view) in enumerate(zip(_views(volume), VIEW_TITLES)):
            horizontal_mm = vy if col == 1 else vx
            ax = axes[row, col]
            shown = ax.imshow(image.T, origin="lower", cmap=cmap, vmin=0.0, vmax=vmax,
                              aspect=vz / horizontal_mm, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label}: {view}", fontsize=9)
        fig.colorbar(shown, ax=axes[row, :].tolist(), shrink=0.8, label="SUV")
    if title:
        fig.suptitle(title, fontsize=10)
    try:
        atomic_write(path, lambda temporary: fig.savefig(temporary, dpi=110, format="png"), ".png")
    finally:
        plt.close(fig)


def save_figure(fig, path, dpi=100):
    """Lay out a matplotlib figure, write it to the PNG ``path`` atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        atomic_write(path, lambda temporary: fig.savefig(temporary, dpi=dpi, format="png"), ".png")
    finally:
        plt.close(fig)
