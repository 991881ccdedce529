"""``hierseq demo`` (what ``make demo`` runs): the leaderboard in miniature, on the embedded Austen corpus.

1. Every registered causal LM is trained for the same token budget at a parameter count matched to the
   transformer control (within 10%), then scored on validation and test bits per byte.
2. A speed curve: forward+backward time and peak memory vs sequence length, ratios vs the control.
3. A sample from the model with the best validation bits per byte.

Everything goes to ``runs/demo/``: ``report.md`` (tables, plots, sample), the JSON behind the tables,
each run's ``metrics.jsonl`` and learning curve. Sized to finish in about 12 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_PROMPT = "It is a truth universally acknowledged"
DEMO_SPEED_LENGTHS = [512, 1024, 2048, 4096]


def run_demo(out_dir: str = "runs/demo", models: list[str] | None = None, seed: int = 0) -> dict:
    import hierseq
    from hierseq.bench.lm import run_lm_bench
    from hierseq.bench.speed import run_speed_bench
    from hierseq.data.tokenizer import ByteTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print("[demo] 1/3 training every causal LM on the embedded Austen corpus (same budget, matched parameters)")
    lm = run_lm_bench(out_dir=str(out / "lm"), size="demo", models=models, seeds=[seed], reuse=False)
    print("[demo] 2/3 speed curve (forward+backward time and memory vs length)")
    speed = run_speed_bench(
        out_dir=str(out / "speed"),
        models=models,
        lengths=DEMO_SPEED_LENGTHS,
        repeats=1,
        time_budget_s=25.0,
        d_model=128,
        n_layers=4,
        batch_size=1,
    )
    best = min(lm["runs"], key=lambda r: r["val_bpb"])
    print(f"[demo] 3/3 sample from the best model by validation bits/byte: {best['model']}")
    model = hierseq.load(Path(best["run_dir"]) / "final")
    tok = ByteTokenizer()
    ids = hierseq.generate(
        model, tok.encode(DEMO_PROMPT)[None], max_new_tokens=300, temperature=0.8, top_p=0.95, seed=seed
    )
    sample = tok.decode(ids[0])
    (out / "sample.txt").write_text(sample + "\n")
    wall = time.time() - started
    summary = {
        "best_model": best["model"],
        "best_val_bpb": best["val_bpb"],
        "wall_s": wall,
        "lm": lm["summary"],
        "speed": speed["results"],
        "sample": sample,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lm_md = (out / "lm" / "lm.md").read_text().split("\n", 2)[2]  # drop the file's own title
    speed_md = (out / "speed" / "speed.md").read_text().split("\n", 2)[2]
    report = "\n".join(
        [
            "# hierseq demo",
            "",
            f"Command: `make demo` (= `hierseq demo`); wall time {wall / 60:.1f} min. Byte-level Austen corpus "
            "split by novel (validation: Northanger Abbey, test: Persuasion).",
            "",
            "## Language modelling (same token budget, matched parameters)",
            "",
            lm_md.strip(),
            "",
            "![learning curves](lm/lm_curves.png)",
            "",
            "## Speed",
            "",
            speed_md.strip(),
            "",
            "![speed](speed/speed.png)",
            "",
            f"## Sample from `{best['model']}` (temperature 0.8, top-p 0.95)",
            "",
            "```",
            sample,
            "```",
            "",
        ]
    )
    (out / "report.md").write_text(report)
    print(
        f"[demo] done in {wall / 60:.1f} min; best {best['model']} at {best['val_bpb']:.3f} val bits/byte; "
        f"report: {out / 'report.md'}"
    )
    print(f"[demo] sample:\n{sample}")
    return summary
