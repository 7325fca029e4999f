"""python -m scripts.train_demo_model: resumable training, the v-prediction fine-tune and its warm restart."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def train(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "scripts.train_demo_model", "--out", str(out), "--batch", "2",
                           "--ckpt-every", "1", "--log-every", "1", "--warmup", "1", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def exported(out: Path) -> tuple[dict, dict]:
    info = json.loads((out / "model" / "training.json").read_text())
    sched = json.loads((out / "model" / "scheduler" / "scheduler_config.json").read_text())
    return info, sched


@pytest.mark.slow
def test_eps_run_then_v_prediction_fine_tune_with_warm_restart(tmp_path):
    out = tmp_path / "run"
    p = train(out, "--total-steps", "2", "--prediction-type", "epsilon")
    assert p.returncode == 0, p.stderr
    info, sched = exported(out)
    assert info["step"] == 2 and info["prediction_type"] == sched["prediction_type"] == "epsilon"

    # Changing the target of a trained state is a fine-tune: refused without a restart point.
    p = train(out, "--total-steps", "4", "--prediction-type", "v_prediction")
    assert p.returncode != 0 and "give --restart-at" in p.stderr

    p = train(out, "--total-steps", "4", "--restart-at", "2", "--prediction-type", "v_prediction")
    assert p.returncode == 0, p.stderr
    info, sched = exported(out)
    assert info["step"] == 4 and info["prediction_type"] == sched["prediction_type"] == "v_prediction"
    assert info["restarts"] == [2]
    assert info["history"] == [{"total_steps": 2, "lr": 1e-3, "prediction_type": "epsilon", "restarts": []}]
    # The warm restart starts the learning rate again from its warm-up (1 step here: the full lr at step 2).
    lines = [line for line in (out / "train_log.txt").read_text().splitlines() if line.startswith("step 3 ")]
    assert lines and "lr 1.00e-03" in lines[0]

    # Resuming later keeps the state's target without being told again.
    p = train(out, "--total-steps", "5", "--restart-at", "2")
    assert p.returncode == 0, p.stderr
    info, _ = exported(out)
    assert info["step"] == 5 and info["prediction_type"] == "v_prediction" and len(info["history"]) == 1


@pytest.mark.slow
def test_new_cycle_starts_from_an_exported_model(tmp_path):
    from safetensors.torch import load_file

    first = tmp_path / "first"
    assert train(first, "--total-steps", "2").returncode == 0
    second = tmp_path / "second"
    p = train(second, "--init-from", str(first / "model"), "--restart-at", "1", "--total-steps", "3")
    assert p.returncode != 0 and "give --restart-at 2" in p.stderr
    # lr 0: the step changes nothing, so the new cycle's weights are exactly the exported ones.
    p = train(second, "--init-from", str(first / "model"), "--restart-at", "2", "--total-steps", "3", "--lr", "0")
    assert p.returncode == 0, p.stderr
    assert f"started from {first / 'model'} at step 2" in (second / "train_log.txt").read_text()
    for part, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        before = load_file(str(first / "model" / part / f"{name}.safetensors"))
        after = load_file(str(second / "model" / part / f"{name}.safetensors"))
        assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)
    info, _ = exported(second)
    assert info["step"] == 3 and info["restarts"] == [2] and info["init_from"] == str(first / "model")
    assert info["history"] == [{"total_steps": 2, "lr": 1e-3, "prediction_type": "v_prediction", "restarts": []}]

    # It resumes from its own state afterwards (--init-from is then ignored), keeping where it came from.
    p = train(second, "--init-from", str(first / "model"), "--restart-at", "2", "--total-steps", "4")
    assert p.returncode == 0, p.stderr
    info, _ = exported(second)
    assert info["step"] == 4 and info["init_from"] == str(first / "model") and len(info["history"]) == 1


def test_lr_schedule_restarts_at_the_given_step():
    from saeuron_demo.schedule import lr_at

    a = argparse.Namespace(lr=1e-3, warmup=10, total_steps=110, restart_at=0, min_lr_frac=0.1)
    assert lr_at(0, a) == pytest.approx(1e-4) and lr_at(10, a) == pytest.approx(1e-3)
    assert lr_at(110, a) == pytest.approx(1e-4)
    b = argparse.Namespace(lr=1e-3, warmup=10, total_steps=210, restart_at=100, min_lr_frac=0.1)
    for step in (0, 5, 10, 60, 110):
        assert lr_at(step + 100, b) == pytest.approx(lr_at(step, a))
