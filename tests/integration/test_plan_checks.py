"""Refusals that come before anything is written: the model directory, the Slurm profile; and a dry run
on a fresh directory that shows what would run instead of failing on data not prepared yet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def _run(*args, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "experiments/qwen_lora_ja.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def test_a_missing_model_directory_is_refused_even_by_the_dry_run(tmp_path):
    proc = _run("--hf-model", str(tmp_path / "no-such-model"), "--dryrun", "--output-dir", "runs", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"model.name: {tmp_path / 'no-such-model'} is not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")
    proc = _run("--hf-model", str(half), "--dryrun", "--output-dir", "runs", cwd=tmp_path)
    assert proc.returncode == 2 and f"model.name: {half} has no a tokenizer, no weights" in proc.stderr, proc.stderr


def test_a_model_of_another_architecture_is_refused_by_the_megatron_backend(tmp_path, tiny_base):
    proc = _run("--dryrun", "--output-dir", "runs", f"model.name={tiny_base}", cwd=tmp_path, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = next(line for line in proc.stderr.splitlines() if line.startswith("error: model.name:"))
    assert "is not the architecture the recipe builds: num_hidden_layers 4 (model.nemo_config Qwen25Config500M: 24)" \
        in line and "vocab_size 2048 (model.nemo_config Qwen25Config500M: 151936)" in line
    assert not (tmp_path / "runs").exists()


def test_an_unknown_slurm_profile_leaves_nothing_behind(tmp_path):
    proc = _run("--executor", "slurm", "--slurm-profile", "no_such_profile", "--smoke", "--output-dir", "runs",
                cwd=tmp_path)
    assert proc.returncode == 2 and "slurm profile 'no_such_profile' not found (known: baremetal_venv, h100_pyxis, " \
        "local)" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()  # no spec.json, lock or launches/ for `jp-peft status` to find


def test_a_dry_run_of_one_stage_on_a_fresh_directory_shows_it(tmp_path):
    proc = _run("--smoke", "--stages", "cpt", "--dryrun", "--output-dir", "runs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "warning: a launch would be refused: cpt.data.blend[ja]: not prepared yet" in proc.stderr
    assert "=== smoke-cpt (cpt): would run ===" in proc.stdout and not (tmp_path / "runs").exists()
    refused = _run("--smoke", "--stages", "cpt", "--output-dir", "runs", cwd=tmp_path)
    assert refused.returncode == 2 and "cpt.data.blend[ja]: not prepared yet" in refused.stderr


def test_a_profile_with_the_examples_placeholders_is_refused_before_anything_is_written(tmp_path):
    """h100_pyxis ships `account: my_account` and mounts under /lustre/fsw/my_account: a launch names each
    field and writes nothing; the dry run shows the same fields as warnings and goes on."""
    proc = _run("--executor", "slurm", "--slurm-profile", "h100_pyxis", "--smoke", "--output-dir", "runs",
                cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = next(line for line in proc.stderr.splitlines() if "placeholder" in line)
    assert "h100_pyxis.yaml: still holds the example profile's placeholder values" in line
    for field in ("account: my_account", "container_mounts[0]: /lustre/fsw/my_account/jp-peft:/lustre/fsw/my_account/jp-peft",
                  "container_mounts[4]: /lustre/fsw/my_account/nemo_home:/root/.cache/nemo"):
        assert field in line, line
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
    ssh = _run("--executor", "slurm", "--slurm-profile", "baremetal_venv", "--smoke", "--output-dir", "runs",
               cwd=tmp_path)
    assert ssh.returncode == 2 and "tunnel.host: login.cluster.example" in ssh.stderr and "tunnel.user: myname" \
        in ssh.stderr, ssh.stderr
    dry = _run("--executor", "slurm", "--slurm-profile", "h100_pyxis", "--smoke", "--dryrun", "--output-dir", "runs",
               cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "warning: a launch would be refused: " in dry.stderr and "placeholder value account: my_account" in dry.stderr
    assert not (tmp_path / "runs").exists()
