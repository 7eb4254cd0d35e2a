"""`dgm eval RUN` and `dgm sample RUN`: work on a run that `dgm train` left, from its own saved
config and its best checkpoint, without training. With the run's own settings both repeat what
the run did at its end: the same keys give the same test figures and the same samples."""

import time
from pathlib import Path

import jax
import numpy as np
from omegaconf import OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from dgm_cli import data as data_lib
from dgm_cli import loop, metrics, pictures, rundir, runtime, settings, steps
from dgm_cli.checkpoints import Checkpoints
from dgm_cli.errors import DgmError, positive_int
from dgm_cli.metrics import write_json_atomically
from dgm_cli.uncertainty import standard_error


def run_directory(path) -> Path:
    run = Path(path)
    if not run.is_dir():
        raise DgmError(f"{run} does not exist" if not run.exists() else f"{run} is not a directory")
    if not (run / ".hydra" / "config.yaml").is_file():
        raise DgmError(f"{run} is not a run directory: it has no .hydra/config.yaml")
    return run


def best_model(run: Path, cfg):
    """(model, its state at the run's best epoch so far, data Spec, Settings, the best epoch,
    the fingerprint of the data it was trained on, or None for a run saved before dgm kept it)."""
    if not (run / "checkpoints").is_dir():
        raise DgmError(f"{run} has no checkpoint yet")
    with Checkpoints(run / "checkpoints") as checkpoints:
        latest = checkpoints.latest_epoch()
        if latest is None:
            raise DgmError(f"{run} has no checkpoint yet")
        record = checkpoints.record(latest)
        spec = data_lib.Spec(**{**record["spec"], "image_shape": tuple(record["spec"]["image_shape"])})
        settings = loop.Settings.from_config(cfg)
        model = loop.build_model(cfg, spec, settings)
        best_epoch = record["history"]["best_epoch"]
        state = checkpoints.restore(best_epoch, like=jax.eval_shape(model.init, jax.random.key(0)))
    return model, state, spec, settings, best_epoch, record.get("data_fingerprint")


def _config(run: Path, overrides: list[str], allowed: tuple[str, ...], options: list[str], command: str, takes: str):
    """The run's saved config with `overrides` of its `allowed` settings, on this machine alone:
    a run trained on several hosts is evaluated by one process, which must not wait for the
    others to join it. Any other key is refused, with the closest real ones (or the command's
    own `options`) and what the command `takes`."""
    saved = rundir.saved_config(run)
    known = [key for key in settings.paths(OmegaConf.to_container(saved)) if key.startswith(allowed)]
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if "=" not in override or key not in known:
            raise DgmError(settings.unknown(key, [*known, *options], what=f"a setting of {command}",
                                            otherwise=f"; {command} takes {takes}"))
    cfg = OmegaConf.merge(saved, OmegaConf.from_dotlist(overrides))
    cfg.distributed.coordinator_address = None
    return cfg


def _options(args: list[str], options: dict, usage: str) -> tuple[dict, list[str]]:
    """`name=value` options of a command (`options`: their defaults), and the other arguments."""
    rest = []
    for arg in args:
        name, _, value = arg.partition("=")
        if name not in options:
            rest.append(arg)
        elif isinstance(options[name], bool) and value in ("true", "false"):
            options[name] = value == "true"
        elif not isinstance(options[name], bool) and value.lstrip("-").isdigit():
            options[name] = int(value)
        else:
            raise DgmError(f"{arg!r}: {usage}")
    return options, rest


EVAL_USAGE = """usage: dgm eval RUN [eval.num_samples=N] [eval.method=is|ais] [eval.num_images=N] [eval.…=…] [seed=S] [headline=true]

Measures the run's best epoch on the test set again, from its saved config and checkpoint: by
importance sampling from q (eval.method=is, eval.num_samples per image), or by annealed importance
sampling (eval.method=ais: eval.ais_steps, eval.ais_chains, and for continuous latents
eval.hmc_leapfrog_steps, eval.hmc_step_size, eval.hmc_target_acceptance); eval.num_images=N
measures the first N test images only. Every evaluation is kept in RUN/evaluations.jsonl;
summary.json reports the best importance-sampled one (exact, or the most samples), or this one
with headline=true, and under test_nll_ais the AIS figure on the most images, then of the most
steps × chains.
"""

SAMPLE_USAGE = """usage: dgm sample RUN [n=64] [seed=S]

Draws n samples from the run's best model into RUN/samples/sample-nN-seedS.png.
"""


def evaluate(args: list[str]) -> None:
    """dgm eval RUN [eval.…=…] [seed=S] [headline=true]: the test figures again, kept in the run."""
    if "--help" in args or "-h" in args:
        print(EVAL_USAGE, end="")
        return
    if not args:
        raise DgmError(EVAL_USAGE.splitlines()[0])
    run = run_directory(args[0])
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    options, overrides = _options(args[1:], {"seed": saved.seed, "headline": False},
                                  "dgm eval takes seed=INTEGER and headline=true|false")
    cfg = _config(run, overrides, ("eval.",), list(options), "dgm eval",
                  "eval.num_samples=N, eval.method=is|ais, eval.num_images=N, eval.batch_size=B, eval.sample_batch=S, "
                  "the AIS settings eval.ais_steps, eval.ais_chains and eval.hmc_…, seed=S and headline=true|false")
    with rundir.exclusive(run, "dgm eval"):
        model, state, settings, best_epoch, test_data, devices = _test_setting(run, cfg, "dgm eval")
        with logging_redirect_tqdm():  # the log lines above the progress bar, as in a training
            if settings.ais:
                evaluation, per_image = loop.ais_evaluation(model, state, test_data, options["seed"], best_epoch,
                                                            settings, devices, "dgm eval")
            else:
                test, evaluation, per_image = loop.test_evaluation(model, state, test_data, options["seed"],
                                                                   best_epoch, settings, devices, "dgm eval")
        if settings.ais:
            print(f"{run}: epoch {best_epoch}, test NLL {loop.describe_ais(evaluation)} (seed {options['seed']}, "
                  f"{len(per_image)} images, {evaluation['seconds']:.0f} s)")
        else:
            print(f"{run}: epoch {best_epoch}, test NLL {loop.describe_test(test, evaluation['num_samples'])} "
                  f"(seed {options['seed']}), test neg-ELBO {test['neg_elbo']:.4f}")
            if not test["converged"]:
                print(f"not converged: {test['convergence']}")
        summary = rundir.summary(run)
        # A run from before evaluations were kept: its summary's figure is the first of them.
        evaluations = metrics.read_evaluations(run) or ([_evaluation_of(summary)] if summary else [])
        evaluation = metrics.append_evaluation(run, evaluation, per_image)
        if summary is None:
            print(f"kept in {run / metrics.EVALUATIONS}; {run} has not finished, so it has no summary.json")
            return
        headline = evaluation if options["headline"] else metrics.best_measured([*evaluations, evaluation], best_epoch)
        summary.update(metrics.headline_figures(headline))
        if settings.ais:
            summary.update(metrics.annealed_figures(metrics.best_annealed([*evaluations, evaluation], best_epoch)))
        write_json_atomically(run / "summary.json", summary)
        how = ("AIS" if headline.get("method") == "ais" else f"{headline['num_samples']} samples"
               if headline["num_samples"] else "exact")
        print(f"kept in {run / metrics.EVALUATIONS}; summary.json reports test NLL {headline['nll']:.4f} ({how})")


def _test_setting(run: Path, cfg, command: str):
    """(model, its best state, Settings, the best epoch, the test images, devices) of a run, for a
    command that measures it on the test set."""
    cache_dir = runtime.configure(cfg)
    model, state, _, settings, best_epoch, fingerprint = best_model(run, cfg)
    loop.check_evaluation(model, settings)
    data = data_lib.load(cfg.dataset, cache_dir and cache_dir / "data")
    if fingerprint is not None and data.fingerprint() != fingerprint:
        raise DgmError(f"the data of {cfg.dataset.name} changed since {run} was trained on them; its test "
                       f"figures are of the data it was trained with, so {command} measures on those only")
    return (model, state, settings, best_epoch, loop.test_images(data.batches()["test"], settings),
            runtime.Devices(data_parallel=False))


GAPS_USAGE = """usage: dgm gaps RUN [images=1000] [steps=500] [elbo_samples=1000] [eval.…=…] [seed=S]

Where the run's best model loses its likelihood to inference (Cremer, Li & Duvenaud 2018), on the
first `images` test images: for each, the ELBO L[q] of the amortised q, the ELBO L[q*] of q refined
for that image alone (`steps` Adam steps at eval.refine_lr, eval.refine_samples draws each, on
per-image shifts of every layer's parameters), and log p(x), by AIS with eval.method=ais, else by
importance sampling from q* with eval.num_samples. Then the approximation gap log p(x) − L[q*]
(what q's family cannot express) and the amortisation gap L[q*] − L[q] (what the encoder's shared
weights give away), each with its standard error over the images. Writes RUN/gaps.json.
"""


def gaps(args: list[str]) -> None:
    """dgm gaps RUN [images=N] [steps=N] [elbo_samples=N] [eval.…=…] [seed=S]: the inference gaps."""
    if "--help" in args or "-h" in args:
        print(GAPS_USAGE, end="")
        return
    if not args:
        raise DgmError(GAPS_USAGE.splitlines()[0])
    run = run_directory(args[0])
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    options, overrides = _options(args[1:], {"seed": saved.seed, "images": 1000, "steps": 500, "elbo_samples": 1000},
                                  "dgm gaps takes images=N, steps=N, elbo_samples=N and seed=INTEGER")
    cfg = _config(run, [f"eval.num_images={positive_int(options['images'], 'images')}", *overrides], ("eval.",),
                  list(options), "dgm gaps", "images=N, steps=N, elbo_samples=N, seed=S and the eval.… settings")
    with rundir.exclusive(run, "dgm gaps"):
        model, state, settings, best_epoch, test_data, devices = _test_setting(run, cfg, "dgm gaps")
        if not hasattr(model, "refinement_objective"):
            raise DgmError(f"dgm gaps: {cfg.model.name}'s likelihood is exact; it has no inference to measure")
        measure = steps.GapSettings(loop.refinement_settings(positive_int(options["steps"], "steps"), cfg.eval),
                                    positive_int(options["elbo_samples"], "elbo_samples"), settings.num_samples,
                                    settings.ais)
        started = time.perf_counter()
        with logging_redirect_tqdm():
            found = steps.log_likelihoods(model, state, test_data["x"], jax.random.fold_in(
                loop.Keys.from_seed(options["seed"]).test, GAPS), 0, settings.sample_batch, devices, settings.progress,
                gaps=measure)
        result = gap_figures(found)
        result.update(epoch=best_epoch, images=int(test_data["x"].shape[0]), seed=options["seed"],
                      steps=measure.refine.steps, refine_lr=measure.refine.learning_rate,
                      refine_samples=measure.refine.samples, elbo_samples=measure.elbo_samples,
                      log_p_by=(f"AIS, {settings.ais.steps} steps × {settings.ais.chains} chains" if settings.ais
                                else f"IS from q*, {settings.num_samples} samples"),
                      seconds=time.perf_counter() - started)
        write_json_atomically(run / "gaps.json", result)
    print(describe_gaps(result))
    print(f"written: {run / 'gaps.json'}")


GAPS = 0x6a95  # folded into the test key for the gaps' draws


def gap_figures(found: dict) -> dict:
    """Means over images, each with its standard error (the gaps paired, image by image)."""
    elbo, refined, log_p = (np.asarray(found[name], np.float64) for name in ("elbo", "refined_elbo", "log_p"))
    figure = lambda values: {"mean": float(np.mean(values)), "stderr": standard_error(values)}
    return {"log_p": figure(log_p), "refined_elbo": figure(refined), "elbo": figure(elbo),
            "approximation_gap": figure(log_p - refined), "amortisation_gap": figure(refined - elbo),
            "refine_gain_last_tenth": float(np.mean(found["refine_gain"]))}


def describe_gaps(result: dict) -> str:
    rows = [("log p(x)", result["log_p"], result["log_p_by"]),
            ("L[q*], refined", result["refined_elbo"], f"{result['steps']} Adam steps a test image"),
            ("L[q], amortised", result["elbo"], f"{result['elbo_samples']} draws"),
            ("approximation gap, log p(x) − L[q*]", result["approximation_gap"], "what q's family cannot express"),
            ("amortisation gap, L[q*] − L[q]", result["amortisation_gap"], "what the shared encoder gives away")]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"epoch {result['epoch']}, {result['images']} test images, nats per image:"]
    lines += [f"  {name:<{width}}  {f['mean']:9.3f} ± {f['stderr']:.3f}  ({why})" for name, f, why in rows]
    lines.append(f"  the refined ELBO rose {result['refine_gain_last_tenth']:.4f} nats over the last tenth of the "
                 f"steps{' (not settled: more steps=N)' if result['refine_gain_last_tenth'] > 0.01 else ''}")
    return "\n".join(lines)


def _evaluation_of(summary: dict) -> dict:
    return {"epoch": summary["best_epoch"], "num_samples": summary["test_nll_samples"],
            "seed": summary.get("test_nll_seed"), "nll": summary["test_nll"], "neg_elbo": summary["test_neg_elbo"],
            "command": "dgm train"}


def sample(args: list[str]) -> None:
    """dgm sample RUN [n=64] [seed=S]: a PNG grid of samples from the run's best model."""
    if "--help" in args or "-h" in args:
        print(SAMPLE_USAGE, end="")
        return
    if not args:
        raise DgmError(SAMPLE_USAGE.splitlines()[0])
    run = run_directory(args[0])
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    options, rest = _options(args[1:], {"n": 64, "seed": saved.seed}, "dgm sample takes n=COUNT and seed=INTEGER")
    cfg = _config(run, rest, (), list(options), "dgm sample", "n=COUNT and seed=INTEGER")
    count = positive_int(options["n"], "n")
    with rundir.exclusive(run, "dgm sample"):
        runtime.configure(cfg)
        model, state, spec, _, best_epoch, _ = best_model(run, cfg)
        # The key the run drew its own samples.png with, for the run's seed.
        key, _ = loop.Keys.from_seed(options["seed"]).picture_keys()
        path = run / "samples" / f"sample-n{count}-seed{options['seed']}.png"
        pictures.save_grid(path, model.sample(state, key, count), spec.image_shape)
    print(f"{count} samples of epoch {best_epoch}: {path}")
