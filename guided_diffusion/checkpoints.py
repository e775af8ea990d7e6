"""
Checkpoint files: weights as a plain ``state_dict`` ``.pt`` plus a JSON sidecar ``NAME.json``.

The sidecar (written by :class:`~guided_diffusion.train_util.TrainLoop`, or by hand for weights
trained elsewhere) holds what is needed to use the weights:

``flags``          architecture and diffusion flags (``script_util`` names)
``cond``           ``"paired"`` (low-dose volume as an input channel) or ``"none"`` (unconditional)
``normalisation``  ``{"clip": SUV, "scale": SUV, "range": [lo, hi]}``: model value =
                   ``lo + (hi - lo) * min(max(suv, 0), clip) / scale``
``voxel_mm``       voxel size the model was trained at (scalar or ``[x, y, z]``, mm)
``patch_size_zxy`` training patch size in the model layout ``(Z, X, Y)``
``sha256``         hash of the weights file (checked when present)

A bare ``.pt`` without sidecar is accepted: flags are inferred from tensor shapes
(:func:`~guided_diffusion.script_util.infer_flags_from_state_dict`); the published 3D DDPM's
conventions (normalisation to ``[0, 1]``, 1.65 mm voxels) are then assumed for the rest.
"""

import hashlib
import os

import torch as th

from . import dist_util
from .normalisation import PUBLISHED_NORMALISATION, x0_clip_range
from .pet.volumes import read_json
from .script_util import (
    create_model_and_diffusion,
    infer_flags_from_state_dict,
    load_checkpoint_strict,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)

#: Conventions of the published 3D DDPM (Yu, Gong et al. 2025), used for a bare ``.pt``.
PUBLISHED_CONVENTIONS = dict(
    cond="paired",
    normalisation=PUBLISHED_NORMALISATION,
    voxel_mm=1.65,
    patch_size_zxy=[96, 192, 288],
)


def sidecar_path(model_path):
    """``checkpoint/NAME.pt`` -> ``checkpoint/NAME.json``."""
    return os.path.splitext(os.fspath(model_path))[0] + ".json"


def sha256_file(path, chunk_bytes=1 << 20):
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def flag_names(cond):
    """The script_util flag names that build a model for ``cond`` ("paired" or "none")."""
    defaults = sr_model_and_diffusion_defaults() if cond == "paired" else model_and_diffusion_defaults()
    return list(defaults)


def read_metadata(model_path):
    """The sidecar of ``model_path`` as a dict, or ``None`` when there is none.

    Raises ValueError naming the file when the sidecar is not valid JSON or lacks ``flags`` /
    ``cond``.
    """
    path = sidecar_path(model_path)
    metadata = read_json(path, "checkpoint metadata")
    if metadata is None:
        return None
    for key in ("flags", "cond"):
        if key not in metadata:
            raise ValueError(f"{path}: checkpoint metadata lacks the key {key!r}")
    if metadata["cond"] not in ("paired", "none"):
        raise ValueError(f"{path}: 'cond' must be 'paired' or 'none', got {metadata['cond']!r}")
    return metadata


def _model_builder(cond):
    return sr_create_model_and_diffusion if cond == "paired" else create_model_and_diffusion


def load_model_and_diffusion(model_path, overrides=None, device=None, verify_hash=True):
    """Build the model and diffusion of a checkpoint and load its weights strictly.

    :param model_path: the ``.pt`` file (plain state_dict).
    :param overrides: flags that replace the sidecar's (e.g. command-line ``timestep_respacing``).
    :param device: where the model goes (default ``dist_util.dev()``).
    :param verify_hash: compare the file's SHA-256 with the sidecar's ``sha256`` when present.
    :return: ``(model, diffusion, metadata)``; ``metadata`` is the sidecar with the flags
        actually used (``flags``), and ``sha256`` of the weights file. The diffusion clips x0
        estimates to the normalisation's :func:`~.normalisation.x0_clip_range`.
    """
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"{model_path}: checkpoint not found")
    metadata = read_metadata(model_path)
    try:
        state_dict = dist_util.load_state_dict(model_path, map_location="cpu")
    except Exception as error:  # pickle, zip and format errors all mean the same to the user
        raise ValueError(f"{model_path}: not a readable torch checkpoint of tensors "
                         f"({type(error).__name__})") from None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{model_path}: not a checkpoint (a state_dict of tensors); it holds a "
                         f"{type(state_dict).__name__}")
    digest = sha256_file(model_path)
    if metadata is None:
        inferred = infer_flags_from_state_dict(state_dict)
        cond = "paired" if inferred.pop("paired") else "none"
        base = dict(PUBLISHED_CONVENTIONS, cond=cond)
        defaults = (sr_model_and_diffusion_defaults() if cond == "paired"
                    else model_and_diffusion_defaults())
        metadata = dict(base, flags=dict(defaults, **{k: v for k, v in inferred.items() if k in defaults}))
    elif verify_hash and metadata.get("sha256") and metadata["sha256"] != digest:
        raise ValueError(
            f"{model_path}: sha256 {digest} does not match {metadata['sha256']} in "
            f"{sidecar_path(model_path)} (corrupt or replaced weights)"
        )
    cond = metadata["cond"]
    names = flag_names(cond)
    flags = {k: v for k, v in metadata["flags"].items() if k in names}
    flags.update({k: v for k, v in (overrides or {}).items() if k in names})
    missing = [k for k in names if k not in flags]
    if missing:
        defaults = sr_model_and_diffusion_defaults() if cond == "paired" else model_and_diffusion_defaults()
        flags.update({k: defaults[k] for k in missing})
    model, diffusion = _model_builder(cond)(**flags)
    diffusion.x0_clip_range = x0_clip_range(metadata.get("normalisation"))
    load_checkpoint_strict(model, state_dict, model_path)
    model.to(device if device is not None else dist_util.dev())
    model.eval()
    return model, diffusion, dict(metadata, flags=flags, sha256=digest)


def warm_start(model, source_path, cond="paired"):
    """Initialise a new training run's ``model`` from the weights of ``source_path``.

    The architectures must match exactly (strict load, the error names the file). When the
    source is a one-step regression model (sidecar ``flags.regression``: the 3D U-Net baseline,
    which only ever saw an empty ``x_t``), the first convolution's ``x_t`` input weights never
    received a gradient; they are zeroed, so the diffusion model starts as the U-Net and learns
    to use ``x_t``.

    :return: the record for the new run's sidecar (``path`` basename, ``sha256``, ``step``,
        ``zeroed_noisy_input``).
    """
    if not os.path.exists(source_path):
        raise FileNotFoundError(f"{source_path}: warm-start checkpoint not found")
    metadata = read_metadata(source_path) or {}
    if metadata.get("cond", cond) != cond:
        raise ValueError(f"{source_path}: a {metadata['cond']!r} checkpoint cannot start a "
                         f"{cond!r} model")
    state_dict = dist_util.load_state_dict(source_path, map_location="cpu")
    load_checkpoint_strict(model, state_dict, source_path)
    zeroed = bool(metadata.get("flags", {}).get("regression")) and cond == "paired"
    if zeroed:
        first = model.input_blocks[0][0]
        with th.no_grad():
            first.weight[:, : first.weight.shape[1] // 2].zero_()
    return dict(path=os.path.basename(source_path), sha256=sha256_file(source_path),
                step=metadata.get("step"), zeroed_noisy_input=zeroed)

