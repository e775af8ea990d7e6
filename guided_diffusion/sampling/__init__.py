"""Whole-volume sampling: a low-dose SUV volume in, the denoised volume out.

The data flow one way, one module per stage:

- :mod:`.transforms`: invertible input transforms (negatives, resampling to the model grid,
  transaxial padding, SUV <-> model space, volume ``(X, Y, Z)`` <-> model ``(1, 1, Z, X, Y)``);
- :mod:`.patches` (splitter and merger) and :mod:`.distributed` (per-rank boxes, halo exchange,
  seam-free patched model);
- :mod:`.guidance`: the sampler's per-step hook interface and its hooks: BC-DPM's block and the
  low-dose acquisition model; :mod:`.data_consistency`: Poisson data consistency;
- :mod:`.postprocess`: the steps run on each finished member (:mod:`.hot_voxels`,
  :mod:`.fusion`);
- :mod:`.denoiser`: :class:`~.denoiser.VolumeDenoiser`, which runs them in order;
- :mod:`.settings`: the one resolver of sampling settings (flag > tuning-table row > checkpoint
  sidecar > default) that every script uses, with its command-line groups in :mod:`.arguments`;
- :mod:`.outputs`: what a batch run writes per input, and the store it resumes from.

May import the core (guided_diffusion's top-level modules) and :mod:`guided_diffusion.pet`;
never :mod:`guided_diffusion.evaluation` or the scripts.
"""
