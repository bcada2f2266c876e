"""`pip install -e .` gives the console commands, and they are the same programs as launchers/*.py."""
import subprocess
import sys
from pathlib import Path

import pytest

from run_fixtures import REPO, launch_env, make_run

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("command", ["thanora-train", "thanora-merge", "thanora-eval"])
def test_console_commands_are_installed(command):
    proc = subprocess.run([str(BIN / command), "--help"], capture_output=True, text=True, timeout=120, env=launch_env())
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def test_thanora_train_runs_a_training(tmp_path):
    config = make_run(tmp_path, train__max_steps=1)
    proc = subprocess.run([str(BIN / "thanora-train"), "--config", str(config)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "final" / "adapter_weights.safetensors").is_file()


def test_the_demo_config_loads():
    from thanora_ds.train_config import load_train_config
    demo = REPO / "configs" / "demo_smollm2.yaml"
    model = REPO / "models" / "smollm2-135m-instruct"
    if not (model / "config.json").is_file():
        pytest.skip("the demo model is made by scripts/demo.sh (scripts/prepare_smollm2.py)")
    cfg = load_train_config(demo)
    assert cfg.train.max_steps == 20 and cfg.train.eval_every == 20
