"""hpcllm entry point: compose -> validate -> plan -> render -> run.

    python launch.py                                   # the main job: tiny model, SFT, 2 CPU ranks
    python launch.py model=pangu_2.6b method=sft hw=a100x8 dry_run=true
    python launch.py -m method=lora method.lora.r=8,16,64 dry_run=true
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import hpcllm.config  # noqa: F401  (registers the schemas and resolvers)
from hpcllm.config import ConfigError
from hpcllm.launch import backends
from hpcllm.launch.job import RunComplete, prepare
from hpcllm.plan import PreflightRefused


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        job = prepare(cfg, HydraConfig.get().runtime.output_dir)
        backends.plan(job)
    except PreflightRefused as err:
        if not cfg.dry_run:
            sys.exit(f"hpcllm: {err}")
        print(f"[dry run] would be refused: {err}")  # a dry run still shows everything it rendered
    except ConfigError as err:
        sys.exit(f"hpcllm: {err}")
    except RunComplete as done:
        print(f"hpcllm: {done}")
        return
    if cfg.dry_run:
        backends.show(job)
        return
    code = backends.run(job)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
