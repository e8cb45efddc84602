"""diffusion_lab."""
