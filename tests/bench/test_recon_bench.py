"""The reconstruction benchmark's quality part through the one training loop (tiny budget; the numbers
are not asserted beyond sanity)."""

from __future__ import annotations

import json

import pytest

import hierseq
from hierseq.bench.recon import model_configs, run_recon_bench
from hierseq.training.metrics import read_metrics


def test_recon_bench_trains_both_models_through_the_loop(tmp_path) -> None:
    report = run_recon_bench(
        out_dir=str(tmp_path),
        steps=5,
        skip_speed=True,
        tasks=["signal"],
        variants=["hama", "flat_mae"],
        log=lambda m: None,
    )
    saved = json.loads((tmp_path / "recon.json").read_text())
    assert set(saved["quality"]) == {"hama", "flat_mae"} and saved["speed"] == {}
    for label in ("hama", "flat_mae"):
        (run,) = saved["quality"][label]["signal"]["runs"]
        events = read_metrics(tmp_path / "runs" / f"{label}-signal-seed0" / "metrics.jsonl")
        assert run["train_loss"] == [e["loss"] for e in events if e["event"] == "train"]  # every fifth: steps 1-5
        assert len(run["train_loss"]) == 5 and events[-1]["event"] == "eval" and events[-1]["step"] == 5
        assert run["final"]["masked_mse"] == events[-1]["val_masked_mse"] and 0 < run["final"]["mse_ratio"]
        assert run["params"] == hierseq.count_parameters(
            hierseq.load(tmp_path / "runs" / f"{label}-signal-seed0" / "final")
        )
    hama = report["quality"]["hama"]["signal"]["mean"]
    assert {"random_mask_masked_mse", "random_mask_mse_ratio"} <= set(hama)  # learned masks vs random ones
    assert 0.0 <= hama["probe_busy_share_of_hidden"] <= 1.0
    assert "| hama |" in (tmp_path / "recon.md").read_text()


def test_recon_variants_mask_75_percent_and_match_parameters() -> None:
    configs = model_configs(64, 4)
    params = run_params(configs)
    for size in ("", "_small"):
        hama, flat = params[f"hama{size}"], params[f"flat_mae{size}"]
        assert abs(hama - flat) / hama < 0.1, (size, hama, flat)  # equal parameters, within a width step
    for name, cfg in configs.values():
        model = hierseq.build_model(name, **cfg)
        if name == "hama":
            assert model.config.layer_plan()[0][2] == 12  # 12 of every 16 tokens hidden at layer 0
        else:
            assert model.config.n_masked(128) == 96
    with pytest.raises(ValueError, match="variants="):
        run_recon_bench(variants=["nope"], log=lambda m: None)


def run_params(configs: dict) -> dict[str, int]:
    return {
        label: hierseq.count_parameters(hierseq.build_model(name, input_type="continuous", d_input=8, **cfg))
        for label, (name, cfg) in configs.items()
    }
