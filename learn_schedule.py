"""Learn a sampler's time grid for one checkpoint (see conf/learn_schedule.yaml):

python learn_schedule.py ckpt_path=<run>/checkpoints/last.ckpt sampler=unipc sampler.nfe=10
python evaluate.py ckpt_path=<same> grid=null sampler=unipc sampler.nfe=10 sampler.schedule=<the written file>
"""

import hydra
from omegaconf import DictConfig

import diffusion_lab  # noqa: F401  (registers the resolver conf/hydra/default.yaml uses)


@hydra.main(version_base="1.3", config_path="conf", config_name="learn_schedule")
def main(cfg: DictConfig) -> None:
    from diffusion_lab.cli import run
    from diffusion_lab.tasks import learn_schedule

    run(learn_schedule, cfg)


if __name__ == "__main__":
    main()
