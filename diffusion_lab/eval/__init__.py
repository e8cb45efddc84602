"""Evaluation: FID/KID (torchmetrics + torch-fidelity Inception), reference caches, bits/dim."""
