"""PET physics and data: geometry, projector, simulation, reconstruction, phantoms, I/O, metrics.

Nothing in this subpackage depends on the diffusion code.
"""
