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
from hpcllm.launch.pipeline import prepare_stages
from hpcllm.plan import choose_layout


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        cfg = choose_layout(cfg)  # layout=auto: the fastest layout predicted to fit, before rendering
        job = prepare(cfg, HydraConfig.get().runtime.output_dir)
        stages = prepare_stages(job) if cfg.pipeline is not None else []  # each stage a job of its own
        refusals = backends.plan_all([stage.job for stage in stages] or [job])
    except ConfigError as err:
        sys.exit(f"hpcllm: {err}")
    except RunComplete as done:
        print(f"hpcllm: {done}")
        return
    if refusals and not cfg.dry_run:
        sys.exit("\n".join(f"hpcllm: {refusal}" for refusal in refusals))
    for refusal in refusals:
        print(f"[dry run] would be refused: {refusal}")  # a dry run still shows everything it rendered
    if cfg.dry_run:
        backends.show(job, stages)
        return
    try:
        code = backends.run(job, stages)
    except ConfigError as err:  # found only when starting: this machine lacks what hw= plans for
        sys.exit(f"hpcllm: {err}")
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
