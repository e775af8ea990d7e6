"""3D diffusion models for PET denoising: a fork of OpenAI guided-diffusion."""
