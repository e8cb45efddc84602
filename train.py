"""Train a diffusion model: `python train.py [experiment=iddpm_cosine] [key=value ...]`, `-m` for sweeps.

Outputs land in the Hydra run directory (outputs/train/runs/<time>/): checkpoints/, samples/, csv/.
"""

import hydra
from omegaconf import DictConfig

import diffusion_lab  # noqa: F401  (registers the resolver conf/hydra/default.yaml uses)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from diffusion_lab.cli import run
    from diffusion_lab.tasks import train

    metrics = run(train, cfg)
    return metrics.get("val/loss")  # the value a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
