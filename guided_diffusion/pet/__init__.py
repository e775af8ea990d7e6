"""PET physics and data: scanner geometry, projectors and linear operators, simulation,
reconstruction (MLEM/OSEM), phantoms and tracers, the Gaussian filter, volume I/O
(npz/NIfTI/DICOM) and dataset manifests.

Arrays are ``(X, Y, Z)`` volumes in SUV or activity units with a 4x4 affine in mm. Nothing here
knows about diffusion models: this package imports nothing from guided_diffusion outside it.
"""
