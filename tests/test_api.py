"""`dgm_cli.train` and `dgm_cli.load_run` as a notebook calls them, in a fresh Python process."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python(script: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path):
    example = re.search(r"<!-- api example -->\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    result = python(example, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "outputs" / "notebook-vae" / "summary.json").is_file()
    assert "test NLL" in result.stdout


@pytest.mark.slow
def test_a_run_from_python_is_the_run_of_the_command_line_and_its_model_gives_its_figures(tmp_path):
    result = python("""
        import json
        import numpy as np
        import dgm_cli

        run = dgm_cli.train(["dataset=digits", "trainer.epochs=2", "eval.num_samples=20", "trainer.progress=false",
                             "hydra.run.dir=run"])
        test = run.images("test")
        again = dgm_cli.load_run("run")
        print(json.dumps({
            "summary": run.summary, "again": again.summary, "repr": repr(again), "finished": run.finished,
            "columns": sorted(run.metrics.columns), "splits": sorted(set(run.metrics["split"])),
            "test_shape": test.shape,
            # the run's own seed and sample count: the very numbers of its test NLL
            "nll": -float(np.mean(again.model.log_likelihood(test))),
            "other_seed": -float(np.mean(again.model.log_likelihood(test, num_samples=20, seed=1))),
            "samples": again.model.sample(5, seed=3).shape,
            "same_samples": bool(np.array_equal(again.model.sample(5, seed=3), run.model.sample(5, seed=3))),
            "reconstructions": run.model.reconstruct(test[:4]).shape,
        }))
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file() and (tmp_path / "run" / "train.log").is_file()
    assert found["summary"] == found["again"] and found["finished"]
    assert found["repr"].startswith("Run('run', model=vae, dataset=digits, test_nll ")
    assert {"epoch", "split", "step", "loss", "examples_per_sec"} <= set(found["columns"])
    assert found["splits"] == ["test", "train", "validation"]
    assert found["test_shape"][1:] == [8, 8]
    assert found["nll"] == pytest.approx(found["summary"]["test_nll"], abs=1e-4)
    assert found["other_seed"] != found["nll"]
    assert found["samples"] == [5, 8, 8] and found["same_samples"] and found["reconstructions"] == [4, 8, 8]


@pytest.mark.slow
def test_sweeps_return_every_run_and_bad_input_raises_one_line(tmp_path):
    result = python("""
        import numpy as np
        import dgm_cli
        from dgm_cli.errors import DgmError

        runs = dgm_cli.train(["-m", "dataset=digits", "trainer.epochs=1", "eval.num_samples=5", "seed=0,1",
                              "trainer.progress=false", "hydra.sweep.dir=sweep"])
        print("sweep", [run.path.name for run in runs], [run.finished for run in runs])
        attempts = {
            "unknown model": lambda: dgm_cli.train(["model=nope"]),
            "bad value": lambda: dgm_cli.train(["dataset=digits", "model.latent_dim=-1", "hydra.run.dir=bad"]),
            "not a list": lambda: dgm_cli.train("model=vae"),
            "no run": lambda: dgm_cli.load_run("missing"),
            "wrong shape": lambda: runs[0].model.log_likelihood(np.zeros((3, 10))),
            "not binary": lambda: runs[0].model.log_likelihood(np.full((3, 64), 0.5)),
            "bad split": lambda: runs[0].images("dev"),
        }
        for name, attempt in attempts.items():
            try:
                attempt()
                print(name, "-> no error")
            except DgmError as error:
                print(name, "->", error)
        print("refused, kept", __import__("os").path.exists("bad"))  # refused before its first epoch: no run
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" -> ") if " -> " in line else line.split(" ", 1) for line in result.stdout.splitlines()
                 if line.startswith(("sweep ", "refused, kept ")) or " -> " in line)
    assert lines["sweep"] == "['0', '1'] [True, True]"
    assert lines["unknown model"] == "unknown model 'nope'; choose from: loglinear, sbn, vae, wakesleep"
    assert lines["bad value"].startswith("model.latent_dim must be a positive integer")
    assert lines["not a list"] == "dgm_cli.train takes a list of overrides, such as ['model=vae']"
    assert lines["no run"] == "missing does not exist"
    assert lines["wrong shape"].startswith("expected images of 64 pixels, [N, 64] or [N, 8, 8]; got an array of shape (3, 10)")
    assert lines["not binary"] == "the models are of binary images: every pixel must be 0 or 1"
    assert lines["bad split"] == "unknown split 'dev'; choose from: train, validation, test"
    assert lines["refused,"] == "kept False"
