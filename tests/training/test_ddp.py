"""DDP: a 2-process CPU ``torchrun`` run equals the 1-process run with the same global batch, for the
causal-LM task and for a task of another kind (regression) through the same loop."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from trainer_helpers import task_config

TORCHRUN = Path(sys.executable).parent / "torchrun"

#: task -> overrides: global batch 4 (one process takes it whole; under torchrun each rank takes 2 rows,
#: and grad_accum=2 further splits them into micro-batches of 1 row). No dropout: ranks draw their own masks.
CASES = {
    "lm": dict(model_config={"d_model": 32, "n_layers": 2, "n_heads": 2}),
    "regression": dict(
        model_config={"d_model": 16, "n_layers": 1, "d_state": 4}, batch_size=4, eval_batch_size=4, keep_best=False
    ),
}


def _losses(out_dir: Path) -> dict[int, float]:
    events = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in events if e.get("loss") is not None}


@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun not installed")
@pytest.mark.parametrize("task", list(CASES))
def test_two_process_torchrun_matches_single_process(tmp_path, task):
    from hierseq.training import train

    common = dict(max_steps=5, eval_every=5, **CASES[task])
    single = train(task_config(task, tmp_path / "single", **common))
    ddp_cfg = task_config(task, tmp_path / "ddp", grad_accum=2, **common)
    cfg_path = tmp_path / "ddp.yaml"
    ddp_cfg.to_yaml(cfg_path)
    torchrun = str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "hierseq.training", str(cfg_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])  # only rank 0 prints the result
    assert result["step"] == 5 and result["stopped_reason"] == "max_steps"

    single_losses, ddp_losses = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert list(ddp_losses) == list(single_losses) == [1, 2, 3, 4, 5]
    for step in single_losses:
        assert ddp_losses[step] == pytest.approx(single_losses[step], abs=1e-5)
    assert result["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)
    if single["test"] is not None:
        assert result["test"]["loss"] == pytest.approx(single["test"]["loss"], abs=1e-5)
    a = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name
    # Only rank 0 wrote files: one metrics line per step plus the final eval (and the test), no duplicates.
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 + (single["test"] is not None)
