"""The benchmarks' shared helpers (bench/<script>.py imports them as `harness.<module>`): common.py (machine facts,
result files, timing, cached scored rows), mnist.py (the MNIST recipes), unet_peers.py (diffusers U-Nets matched to
ours), solver_peers.py (diffusers' schedulers on exact models)."""
