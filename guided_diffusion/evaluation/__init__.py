"""Evaluation: image-quality metrics (UDPET conventions), classical baselines (Gaussian,
BM3D, NLM) with their tuning, figures, validation during training, the model-card quality
report and the tuning of sampling settings on validation volumes.

May import the core, :mod:`guided_diffusion.pet` and :mod:`guided_diffusion.sampling`; the
scripts import it as a normal package.
"""
