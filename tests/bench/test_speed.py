"""Speed benchmark plumbing at tiny sizes: summary table, generation cost rows for every model, peers
(missing, unsupported, and a real ratio against mambapy when it is installed), sweep statuses."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import hierseq
from hierseq.bench import peers as peers_mod
from hierseq.bench.generation_cost import check_contexts, measure_generation
from hierseq.bench.speed import SUMMARY_LENGTHS, run_speed_bench
from hierseq.bench.sweep import budgeted_sweep, predicted_peak
from hierseq.cli import main

TINY = {"repeats": 1, "d_model": 32, "n_layers": 1, "batch_size": 1}


def _missing_peer(name: str = "nosuch") -> peers_mod.Peer:
    return peers_mod.Peer(name, name, "hierseq_no_such_module", None, "vsa", "nothing", lambda shape: None)


def _trivial_peer() -> peers_mod.Peer:
    """A peer that is "installed" (torch imports) and whose steps do a fixed amount of work each."""

    def make(shape: peers_mod.PeerShape):
        x = torch.randn(shape.batch, shape.length, shape.d_model)
        return (lambda: x.sum()), (lambda: (x @ x.transpose(1, 2)).sum()), 0, 0

    return peers_mod.Peer("trivial", "torch", "torch", None, "vsa", "sum vs matmul", make)


def test_summary_table_and_generation_rows_for_every_model(tmp_path: Path) -> None:
    models = hierseq.list_models(kind="causal_lm")
    report = run_speed_bench(str(tmp_path), lengths=[64, 128], gen_contexts=[32, 64], gen_tokens=2, **TINY)
    assert set(report["generation"]) == set(models)
    for label, rows in report["generation"].items():
        assert [r["context"] for r in rows] == [32, 64], label
        assert all(r["status"] == "ok" and r["ms_per_token"] > 0 and r["new_tokens"] == 2 for r in rows), label
    assert all(r["ms_per_token_ratio_vs_transformer"] == 1.0 for r in report["generation"]["transformer"])

    summary = {entry["model"]: entry for entry in report["summary"]}
    assert set(summary) == set(models)
    for entry in summary.values():
        assert entry["longest_ok_length"] == 128
        assert all(entry["vs_transformer"][str(n)] is None for n in SUMMARY_LENGTHS)  # not in this run
        gen = entry["generation"]["64"]
        mine = next(r for r in report["generation"][entry["model"]] if r["context"] == 64)
        assert gen["ms_per_token"] == mine["ms_per_token"]
        assert gen["ratio_vs_transformer"] == pytest.approx(
            mine["ms_per_token"] / report["generation"]["transformer"][1]["ms_per_token"]
        )
    assert "peers" not in report  # nothing changes without --peers

    md = (tmp_path / "speed.md").read_text()
    header = md.split("## Summary", 1)[1].strip().splitlines()[0]
    for column in ("longest ok length", "fwd+bwd ×T @4096", "mem ×T @4096", "fwd+bwd ×T @16384", "mem ×T @16384"):
        assert column in header
    assert "gen ms/token @32 (×T)" in header and "gen ms/token @64 (×T)" in header
    assert md.index("## Summary") < md.index("## Time and memory per length")
    assert json.loads((tmp_path / "speed.json").read_text())["summary"] == report["summary"]


def test_summary_shows_ratios_and_statuses_at_the_summary_lengths(tmp_path: Path) -> None:
    import hierseq.bench.speed as speed

    report = {
        "gen_contexts": [],
        "generation": {},
        "results": {
            "transformer": [{"length": 4096, "status": "ok", "forward_backward_ratio_vs_transformer": 1.0}],
            "tree": [
                {
                    "length": 4096,
                    "status": "ok",
                    "forward_backward_ratio_vs_transformer": 0.5,
                    "memory_ratio_vs_transformer": 0.25,
                },
                {"length": 16384, "status": "oom"},
            ],
        },
    }
    report["summary"] = speed._summary(report)
    tree = report["summary"][1]
    assert tree["longest_ok_length"] == 4096
    assert tree["vs_transformer"]["4096"]["forward_backward_ratio"] == 0.5
    assert tree["vs_transformer"]["16384"]["status"] == "oom"
    row = speed._summary_markdown(report)[2].splitlines()[-1]
    assert row == "| tree | 4096 | 0.50× | 0.25× | oom | oom |"


class _NoCacheLM(torch.nn.Module):
    config = SimpleNamespace(vocab_size=8)

    def __init__(self, takes_cache: bool) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(8, 8)
        if not takes_cache:
            self.forward = lambda input_ids: SimpleNamespace(logits=self.emb(input_ids))

    def forward(self, input_ids, cache=None, use_cache=False):
        return SimpleNamespace(logits=self.emb(input_ids), cache=None)


@pytest.mark.parametrize("takes_cache", [True, False])
def test_generation_without_a_cache_is_a_status(takes_cache: bool) -> None:
    assert measure_generation(_NoCacheLM(takes_cache), 16, new_tokens=2) == {"status": "no cache"}


def test_check_contexts() -> None:
    assert check_contexts(None) == check_contexts([]) == check_contexts([0]) == []
    assert check_contexts([64, 32]) == [32, 64]
    for bad in ([-1], [0, 32]):
        with pytest.raises(ValueError, match="gen_contexts"):
            check_contexts(bad)


def test_budgeted_sweep_statuses() -> None:
    def oom_at_two(n: int) -> dict:
        if n == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate")
        return {"status": "ok"}

    rows = budgeted_sweep([1, 2, 3], oom_at_two, time_budget_s=1e9)
    assert [r["status"] for r in rows] == ["ok", "oom", "oom"] and [r["length"] for r in rows] == [1, 2, 3]
    rows = budgeted_sweep([1, 2], lambda n: {"status": "ok"}, time_budget_s=0.0, key="context")
    assert rows == [{"context": 1, "status": "ok"}, {"context": 2, "status": "time budget"}]
    with pytest.raises(RuntimeError, match="shape mismatch"):
        budgeted_sweep([1], lambda n: (_ for _ in ()).throw(RuntimeError("shape mismatch")), 1e9)


def test_budgeted_sweep_skips_a_point_whose_extrapolated_peak_is_over_the_limit() -> None:
    ran: list[int] = []

    def quadratic(n: int) -> dict:  # peak grows as n**2, like a dense L x L mask
        ran.append(n)
        return {"status": "ok", "peak_mem_mb": float(n * n)}

    rows = budgeted_sweep([1, 2, 4, 8, 16], quadratic, 1e9, memory_limit_mb=20.0)
    # 16 MiB measured at 4; 8 extrapolates (exponent 2 from the points 2 and 4) to 64 > 20
    assert ran == [1, 2, 4] and [r["status"] for r in rows] == ["ok"] * 3 + ["predicted oom"] * 2
    linear = budgeted_sweep([1, 2, 4], lambda n: {"status": "ok", "peak_mem_mb": 5.0 * n}, 1e9, memory_limit_mb=20.0)
    assert [r["status"] for r in linear] == ["ok", "ok", "ok"]  # 20 predicted at 4 (exponent 1): not over
    assert predicted_peak([{"length": 10, "status": "ok", "peak_mem_mb": 3.0}], 20, "length", "peak_mem_mb") == 12.0
    assert predicted_peak([], 20, "length", "peak_mem_mb") is None


def test_peers_none_installed_is_a_one_line_cli_error(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setattr(peers_mod, "PEERS", [_missing_peer("a"), _missing_peer("b")])
    with pytest.raises(ValueError, match=r"hierseq\[peers\]"):
        run_speed_bench(str(tmp_path), peers=True)
    code = main(["bench", "speed", "--peers", "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("hierseq: error: --peers:") and "hierseq[peers]" in err[0]
    assert not (tmp_path / "cli").exists()  # failed before measuring anything
    with pytest.raises(ValueError, match="peers='nope'"):
        peers_mod.select_peers(["nope"])


def test_missing_peer_is_noted_next_to_a_measured_one(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(peers_mod, "PEERS", [_missing_peer(), _trivial_peer()])
    report = run_speed_bench(str(tmp_path), models=["transformer"], lengths=[32], gen_contexts=[], peers=True, **TINY)
    notes, rows = report["peers"]["notes"], report["peers"]["rows"]
    assert notes[0]["peer"] == "nosuch" and notes[0]["status"] == peers_mod.NOT_INSTALLED
    assert "hierseq_no_such_module" in notes[0]["import_error"]
    assert [(r["peer"], r["length"], r["status"]) for r in rows] == [("trivial", 32, "ok")]
    assert rows[0]["ours_over_peer"] == pytest.approx(rows[0]["ours_fwd_bwd_ms"] / rows[0]["peer_fwd_bwd_ms"])
    md = (tmp_path / "speed.md").read_text()
    assert "## Peers" in md and "- nosuch (vs vsa): not installed: pip install hierseq[peers]" in md


def test_mambapy_peer_ratio_at_a_tiny_shape(tmp_path: Path) -> None:
    pytest.importorskip("mambapy.mamba", reason="mambapy (peers extra) is not installed")
    report = run_speed_bench(str(tmp_path), models=["mamba"], lengths=[64], gen_contexts=[], peers=["mambapy"], **TINY)
    (row,) = report["peers"]["rows"]
    assert (row["peer"], row["ours"], row["length"], row["status"]) == ("mambapy", "mamba (backbone)", 64, "ok")
    assert row["ours_fwd_bwd_ms"] > 0 and row["peer_fwd_bwd_ms"] > 0
    assert row["ours_over_peer"] == pytest.approx(row["ours_fwd_bwd_ms"] / row["peer_fwd_bwd_ms"])
    # same architecture at the same width and depth: parameter counts within 1%
    assert row["ours_params"] == pytest.approx(row["peer_params"], rel=0.01)
    assert report["peers"]["notes"] == []


def test_h_transformer_peer_rejects_lengths_outside_its_design() -> None:
    pytest.importorskip("h_transformer_1d", reason="h-transformer-1d (peers extra) is not installed")
    (peer,) = peers_mod.select_peers(["h-transformer-1d"])
    config = {"d_model": 32, "n_layers": 1, "n_heads": 1, "leaf_size": 16, "n_summary": 4}
    result = peers_mod.run_peers([peer], {"tree": config}, [48, 64], 32, 1, 1, torch.device("cpu"), 1e9)
    assert [r["status"] for r in result["rows"]][0].startswith("unsupported: length 48")
    assert result["rows"][1]["status"] == "ok"


def test_cli_gen_contexts(monkeypatch) -> None:
    import hierseq.bench.speed as speed

    seen: list[dict] = []
    monkeypatch.setattr(speed, "run_speed_bench", lambda **kw: seen.append(kw))
    for argv, expected in (([], [1024, 4096, 16384]), (["--gen-contexts", ""], []), (["--gen-contexts", "0"], [0])):
        assert main(["bench", "speed", *argv]) == 0
        assert seen[-1]["gen_contexts"] == expected and seen[-1]["peers"] is False


def test_the_allocator_setting_is_recorded_with_the_numbers(monkeypatch, tmp_path: Path) -> None:
    # CPU times move with glibc's mmap policy, so a report says which one it was measured under.
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    report = run_speed_bench(str(tmp_path), models=["linear_attn"], lengths=[32], gen_contexts=[], **TINY)
    assert report["glibc_tunables"] == "glibc.malloc.mmap_max=0"
    assert "Allocator: GLIBC_TUNABLES=glibc.malloc.mmap_max=0." in (tmp_path / "speed.md").read_text()
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert (
        run_speed_bench(str(tmp_path / "default"), models=["linear_attn"], lengths=[32], gen_contexts=[], **TINY)[
            "glibc_tunables"
        ]
        is None
    )
