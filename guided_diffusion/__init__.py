"""3D diffusion models for low-dose PET denoising, a fork of OpenAI's guided_diffusion.

Packages and what each may import (data flow one way: pet -> core -> sampling -> evaluation):

- core (the modules directly in this package, upstream's names: ``unet``, ``gaussian_diffusion``,
  ``respace``, ``script_util`` (with the shared runtime argument group), ``train_util``,
  ``image_datasets``, ... plus ``checkpoints`` and ``normalisation``): models, diffusion,
  training, checkpoints, the SUV <-> model-space normalisation. May import ``pet``.
- :mod:`guided_diffusion.pet`: PET physics and data, no diffusion code. Imports nothing else here.
- :mod:`guided_diffusion.sampling`: whole-volume denoising. May import core and ``pet``.
- :mod:`guided_diffusion.evaluation`: metrics, baselines, figures, quality reports, tuning. May
  import everything above.
"""
