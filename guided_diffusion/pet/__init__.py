"""PET physics and data: scanner geometry, projectors and linear operators, the Gaussian filter,
simulation and acquisition/reconstruction settings (MLEM/OSEM), phantoms (shapes, random fields,
whole body, head, dead leaves) and tracers, the dataset generators (3D pairs, 2D slices),
dataset manifests and volume I/O (npz/NIfTI/DICOM in, DICOM out).

Arrays are ``(X, Y, Z)`` volumes in SUV or activity units with a 4x4 affine in mm. Nothing here
knows about diffusion models: this package imports nothing from guided_diffusion outside it.
"""
