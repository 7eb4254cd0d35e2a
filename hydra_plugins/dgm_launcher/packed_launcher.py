"""`hydra/launcher=packed`: a sweep's jobs that differ only in numbers train as one vmapped
program on one device (`dgm_cli.packing`); the others run one after another, as Hydra's basic
launcher runs them. `hydra/launcher=packed_submitit_local` and `packed_submitit_slurm` submit
each group as one job through Hydra's submitit launcher, so that packing and scale-out compose.

Hydra imports every plugin when it starts: dgm_cli's heavy modules load only once jobs run.
"""

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


def _compose(hydra_context, config, overrides: Sequence[str], num: int, job_id=None):
    """A job's whole config, as Hydra's launchers compose it."""
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = num if job_id is None else job_id
        sweep_config.hydra.job.num = num
    return sweep_config


def _task_config(sweep_config):
    task_cfg = copy.deepcopy(sweep_config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    return task_cfg


def groups(configs) -> list[list[int]]:
    from dgm_cli import packing

    return packing.groups([_task_config(config) for config in configs])


def _prepared(sweep_config) -> JobReturn:
    """What Hydra's `run_job` makes of a job before it calls the task: its output directory,
    made, and its JobReturn, yet without a result."""
    previous = HydraConfig.instance().cfg
    try:
        HydraConfig.instance().set_config(sweep_config)
        output_dir = os.path.join(str(OmegaConf.select(sweep_config, "hydra.sweep.dir")),
                                  str(OmegaConf.select(sweep_config, "hydra.sweep.subdir")))
        with read_write(sweep_config.hydra.runtime), open_dict(sweep_config.hydra.runtime):
            sweep_config.hydra.runtime.output_dir = os.path.abspath(output_dir)
        HydraConfig.instance().set_config(sweep_config)
        job = JobReturn()
        job.cfg = _task_config(sweep_config)
        job.hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
        job.overrides = OmegaConf.to_container(sweep_config.hydra.overrides.task)
        job.working_dir = os.getcwd()
        job.task_name = sweep_config.hydra.job.name
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        return job
    finally:
        HydraConfig.instance().cfg = previous


def run_group(hydra_context, task_function, sweep_configs) -> list[JobReturn]:
    """One group's jobs: a job alone runs as Hydra runs any; several train as one packed program."""
    if len(sweep_configs) == 1:
        return [run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_configs[0],
                        job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")]
    from dgm_cli.cli import train_group

    # The terminal in the jobs' format; each job's train.log is dgm_cli.packing's to write.
    console = copy.deepcopy(sweep_configs[0].hydra.job_logging)
    with open_dict(console):
        console.handlers.pop("file", None)
        console.root.handlers = [name for name in console.root.handlers if name != "file"]
    configure_log(console, sweep_configs[0].hydra.verbose)
    jobs = [_prepared(sweep_config) for sweep_config in sweep_configs]
    for sweep_config in sweep_configs:
        hydra_context.callbacks.on_job_start(config=sweep_config, task_function=task_function)
    values = train_group([(job.cfg, job.hydra_cfg.hydra) for job in jobs])
    for job, value, sweep_config in zip(jobs, values, sweep_configs):
        job.status, job.return_value = JobStatus.COMPLETED, value  # a failed job: None, as a job alone returns
        hydra_context.callbacks.on_job_end(config=sweep_config, job_return=job)
    return jobs


@dataclass
class PackedLauncherConf:
    _target_: str = "hydra_plugins.dgm_launcher.packed_launcher.PackedLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="packed", node=PackedLauncherConf, provider="dgm")


class PackedLauncher(Launcher):
    def setup(self, *, hydra_context, task_function, config) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = [_compose(self.hydra_context, self.config, overrides, initial_job_idx + index)
                   for index, overrides in enumerate(job_overrides)]
        found = groups(configs)
        log.info(f"Launching {len(configs)} jobs in {len(found)} group(s), each trained as one program")
        returns = {}
        for group in found:
            log.info(f"\t#{', #'.join(str(initial_job_idx + index) for index in group)} : "
                     + "; ".join(" ".join(filter_overrides(job_overrides[index])) for index in group))
            for index, job in zip(group, run_group(self.hydra_context, self.task_function,
                                                   [configs[index] for index in group])):
                returns[index] = job
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [returns[index] for index in range(len(configs))]


try:
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
except ImportError:  # without dgm's `slurm` extra: hydra/launcher=packed alone
    pass
else:
    class _PackedSubmitit:
        """Hydra's submitit launcher, given one group a job: its `launch` submits a job for each
        group's first, and each submitted job composes and trains its whole group."""

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            found = groups([_compose(self.hydra_context, self.config, overrides, initial_job_idx + index)
                            for index, overrides in enumerate(job_overrides)])
            self._groups = {initial_job_idx + position: [(list(job_overrides[index]), initial_job_idx + index)
                                                         for index in group] for position, group in enumerate(found)}
            per_group = super().launch([job_overrides[group[0]] for group in found], initial_job_idx)
            returns = {index: job for group, jobs in zip(found, per_group) for index, job in zip(group, jobs)}
            return [returns[index] for index in range(len(job_overrides))]

        def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state) -> list[JobReturn]:
            import submitit
            from hydra.core.singleton import Singleton

            Singleton.set_state(singleton_state)
            setup_globals()
            job_id = submitit.JobEnvironment().job_id
            configs = [_compose(self.hydra_context, self.config, overrides, num, job_id)
                       for overrides, num in self._groups[job_num]]
            return run_group(self.hydra_context, self.task_function, configs)

    class PackedSubmititLocalLauncher(_PackedSubmitit, LocalLauncher):
        pass

    class PackedSubmititSlurmLauncher(_PackedSubmitit, SlurmLauncher):
        pass

    @dataclass
    class PackedLocalQueueConf(LocalQueueConf):
        _target_: str = "hydra_plugins.dgm_launcher.packed_launcher.PackedSubmititLocalLauncher"

    @dataclass
    class PackedSlurmQueueConf(SlurmQueueConf):
        _target_: str = "hydra_plugins.dgm_launcher.packed_launcher.PackedSubmititSlurmLauncher"

    ConfigStore.instance().store(group="hydra/launcher", name="packed_submitit_local", node=PackedLocalQueueConf,
                                 provider="dgm")
    ConfigStore.instance().store(group="hydra/launcher", name="packed_submitit_slurm", node=PackedSlurmQueueConf,
                                 provider="dgm")
