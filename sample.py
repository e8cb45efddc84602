"""Sample a trained checkpoint: `python sample.py ckpt_path=<run>/checkpoints/last.ckpt [key=value ...]` (see conf/sample.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from diffusion_lab.tasks import sample

    sample(cfg)


if __name__ == "__main__":
    main()
