"""Sample a trained checkpoint (see conf/sample.yaml):

python sample.py ckpt_path=<run>/checkpoints/last.ckpt [key=value ...]
"""

import hydra
from omegaconf import DictConfig

import diffusion_lab  # noqa: F401  (registers the resolver conf/hydra/default.yaml uses)


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from diffusion_lab.cli import run
    from diffusion_lab.tasks import sample

    run(sample, cfg)


if __name__ == "__main__":
    main()
