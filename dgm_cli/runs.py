"""`dgm eval RUN` and `dgm sample RUN`: work on a run that `dgm train` left, from its own saved
config and its best checkpoint, without training. With the run's own settings both repeat what
the run did at its end: the same keys give the same test figures and the same samples."""

from pathlib import Path

import jax
from omegaconf import OmegaConf

from dgm_cli import data as data_lib
from dgm_cli import pictures, runtime, train
from dgm_cli.checkpoints import Checkpoints
from dgm_cli.errors import DgmError, positive_int
from dgm_cli.metrics import write_json_atomically


def run_directory(path) -> Path:
    run = Path(path)
    if not run.is_dir():
        raise DgmError(f"{run} does not exist" if not run.exists() else f"{run} is not a directory")
    if not (run / ".hydra" / "config.yaml").is_file():
        raise DgmError(f"{run} is not a run directory: it has no .hydra/config.yaml")
    return run


def _best_model(run: Path, cfg):
    """The run's model, its state at the best epoch, and the checkpoint's record."""
    if not (run / "checkpoints").is_dir():
        raise DgmError(f"{run} has no checkpoint yet")
    with Checkpoints(run / "checkpoints") as checkpoints:
        latest = checkpoints.latest_epoch()
        if latest is None:
            raise DgmError(f"{run} has no checkpoint yet")
        record = checkpoints.record(latest)
        spec = data_lib.Spec(**{**record["spec"], "image_shape": tuple(record["spec"]["image_shape"])})
        settings = train.Settings.from_config(cfg)
        model = train.build_model(cfg, spec, settings)
        best_epoch = record["history"]["best_epoch"]
        state = checkpoints.restore(best_epoch, like=jax.eval_shape(model.init, jax.random.key(0)))
    return model, state, spec, settings, best_epoch


def _config(run: Path, overrides: list[str], allowed: tuple[str, ...]):
    for override in overrides:
        if "=" not in override or not override.startswith(allowed):
            raise DgmError(f"{override!r}: this command takes {', '.join(a + '…' for a in allowed)} overrides only")
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


def evaluate(args: list[str]) -> None:
    """dgm eval RUN [eval.num_samples=N ...]: the test figures again; summary.json updated."""
    if not args:
        raise DgmError("usage: dgm eval RUN [eval.num_samples=N]")
    run = run_directory(args[0])
    cfg = _config(run, args[1:], ("eval.",))
    cache_dir = runtime.configure(cfg)
    model, state, spec, settings, best_epoch = _best_model(run, cfg)
    data = data_lib.load(cfg.dataset, cache_dir and cache_dir / "data")
    devices = runtime.Devices(data_parallel=False)
    test = train.evaluate_test(model, state, devices.put(data.batches()["test"]), train.Keys.from_seed(cfg.seed).test,
                               settings, devices)
    samples = 0 if model.exact_likelihood else settings.num_samples
    print(f"{run}: epoch {best_epoch}, test NLL {test['nll']:.4f} nats ({samples or 'exact, no'} samples), "
          f"test neg-ELBO {test['neg_elbo']:.4f}")
    summary_path = run / "summary.json"
    if summary_path.is_file():
        summary = OmegaConf.to_container(OmegaConf.load(summary_path))
        summary.update(test_nll=test["nll"], test_nll_samples=samples, test_neg_elbo=test["neg_elbo"])
        write_json_atomically(summary_path, summary)
        print(f"updated {summary_path}")
    else:
        print(f"{run} has not finished, so it has no summary.json to update")


def sample(args: list[str]) -> None:
    """dgm sample RUN [n=64] [seed=S]: a PNG grid of samples from the run's best model."""
    if not args:
        raise DgmError("usage: dgm sample RUN [n=64] [seed=S]")
    run = run_directory(args[0])
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    options = {"n": 64, "seed": cfg.seed}
    for arg in args[1:]:
        name, _, value = arg.partition("=")
        if name not in options or not value.lstrip("-").isdigit():
            raise DgmError(f"{arg!r}: dgm sample takes n=COUNT and seed=INTEGER")
        options[name] = int(value)
    count = positive_int(options["n"], "n")
    runtime.configure(cfg)
    model, state, spec, _, best_epoch = _best_model(run, cfg)
    # The key the run drew its own samples.png with, for the run's seed.
    key, _ = train.Keys.from_seed(options["seed"]).picture_keys()
    path = run / "samples" / f"sample-n{count}-seed{options['seed']}.png"
    pictures.save_grid(path, model.sample(state, key, count), spec.image_shape)
    print(f"{count} samples of epoch {best_epoch}: {path}")
