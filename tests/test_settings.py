"""No setting silently ignored: a key that the config lacks, misspelt with or without +, is
refused in one line with the closest real ones, by every command and from Python; and Hydra's
own errors (an override it cannot read, a plugin not installed) in dgm's voice."""

import re

import pytest
from omegaconf import OmegaConf

import dgm_cli
from dgm_cli import cli, runs, settings
from dgm_cli.errors import DgmError
from tests.test_cli import assert_one_line_error, dgm

EPOCH = "trainer.epoch is not a setting; did you mean trainer.epochs?"


@pytest.fixture
def saved_run(make_config, tmp_path):
    """A run directory as far as the commands read it before any work: its saved config."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(make_config("dataset=digits")))
    (run / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(["dataset=digits"]))
    return run


@pytest.mark.parametrize("typed", ["trainer.epoch=1", "+trainer.epoch=1"])
def test_dgm_train_refuses_a_misspelt_key_with_or_without_plus(tmp_path, typed):
    assert_one_line_error(dgm("train", typed, cwd=tmp_path), EPOCH)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("args,message", [
    (["++trainer.epoch=1"], EPOCH),
    (["-m", "trainer.epoch=1,2"], EPOCH),  # in a sweep, before any job
    (["-m", "model=vae,sbn", "model.layers=[200]"], "model.layers is not a setting of model=vae; model=sbn and "
                                                     "model=wakesleep have it"),
    (["model=sbn", "+model.layer=[3]"], "model.layer is not a setting; did you mean model.layers?"),
    (["+trainer.epochs=3"], "trainer.epochs is a setting already: set it without the +, as trainer.epochs=3"),
    (["~trainer.patience"], "~trainer.patience would delete a setting that dgm needs"),
])
def test_every_key_of_every_job_is_checked(args, message):
    with pytest.raises(DgmError, match=re.escape(message)):
        settings.check(args)


@pytest.mark.parametrize("args", [
    ["+optimizer.eps_root=1e-8", "optimizer.b1=0.8"],  # optax's own arguments, which optax checks
    ["++hydra.job.name=x", "hydra.run.dir=somewhere", "hydra/launcher=basic"],  # Hydra's own
    ["-m", "experiment=sbn_mnist", "method=glob(*)", "trainer.diagnostics_every=25", "optimizer.lr=tag(log,interval(1e-4,1e-2))"],
    ["--cfg", "job", "dataset=numpy", "dataset.path=x.npz"],
])
def test_the_keys_a_user_may_add_keep_working(args):
    settings.check(args)


def test_eval_sample_rerun_and_resume_refuse_a_misspelt_key(saved_run):
    with pytest.raises(DgmError, match="eval.num_smaples is not a setting of dgm eval; did you mean eval.num_samples?"):
        runs.evaluate([str(saved_run), "eval.num_smaples=10"])
    with pytest.raises(DgmError, match="trainer.epochs is not a setting of dgm eval; dgm eval takes eval.num_samples=N"):
        runs.evaluate([str(saved_run), "trainer.epochs=3"])
    with pytest.raises(DgmError, match="seeds is not a setting of dgm sample; did you mean seed?"):
        runs.sample([str(saved_run), "seeds=3"])
    with pytest.raises(DgmError, match=EPOCH):
        cli.rerun([str(saved_run), "+trainer.epoch=1"])
    with pytest.raises(DgmError, match=EPOCH):
        cli._train_arguments([f"resume={saved_run}", "trainer.epoch=5"])
    with pytest.raises(DgmError, match="distributed.proces_id is not a setting; did you mean distributed.process_id?"):
        cli._train_arguments([f"resume={saved_run}", "distributed.proces_id=1"])
    assert sorted(path.name for path in saved_run.iterdir()) == [".hydra"]  # nothing written


def test_the_python_api_refuses_a_misspelt_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DgmError, match=EPOCH):
        dgm_cli.train(["+trainer.epoch=1"])
    assert not (tmp_path / "outputs").exists()


# Hydra's errors in dgm's voice.

def test_a_list_the_shell_split_at_its_space_is_one_line_that_says_to_quote_it(tmp_path):
    result = dgm("train", "model.hidden=[500,", "500]", cwd=tmp_path)  # what `model.hidden=[500, 500]` reaches
    assert_one_line_error(result, "model.hidden=[500, 500] reached dgm as 2 words, split by the shell at its spaces: "
                                  "quote it, 'model.hidden=[500, 500]', or write it without spaces, model.hidden=[500,500]")
    assert "hydra.cc" not in result.stderr and "Lexer" not in result.stderr


@pytest.mark.parametrize("args,message", [
    (["model.hidden=[500"], "model.hidden=[500 has an unclosed bracket"),
    (["dataset=digits", "500"], "500 is not an override (KEY=VALUE, GROUP=OPTION, +KEY=VALUE or ~KEY)"),
    (["optimizer.lr=1e-3)"], "cannot read the override optimizer.lr=1e-3) ("),
])
def test_an_override_hydra_cannot_read_says_why_and_how_to_write_it(args, message):
    with pytest.raises(DgmError, match=re.escape(message)):
        settings.check(args)


@pytest.mark.parametrize("option,extra,package", [
    ("hydra/sweeper=optuna", "optuna", "hydra-optuna-sweeper"),
    ("hydra/launcher=submitit_slurm", "slurm", "hydra-submitit-launcher"),
])
def test_a_plugin_that_is_not_installed_names_its_extra(monkeypatch, option, extra, package):
    from hydra import compose, initialize_config_module
    from hydra.core.config_store import ConfigStore

    group, name = option.split("=")
    with initialize_config_module("dgm_cli.configs", version_base="1.3"):  # Hydra finds the plugins
        monkeypatch.delitem(ConfigStore.instance().repo["hydra"][group.split("/")[1]], f"{name}.yaml")
        with pytest.raises(Exception) as raised:  # as if the plugin had never been installed
            compose("train", overrides=[option], return_hydra_config=True)
    assert cli.one_line(raised.value) == f'{option} needs its Hydra plugin: pip install -e ".[{extra}]" (or pip install {package})'
