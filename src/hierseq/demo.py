"""``hierseq demo`` (what ``make demo`` runs): train the control LM on the embedded Austen corpus for a
few minutes, then report validation/test bits per byte, training tokens/s and a generated sample in
``runs/demo/``. The leaderboard of every model joins this report as the models land."""

from __future__ import annotations

import json
import time
from pathlib import Path

#: The control's demo size: ~3.3M parameters, a context of 256 bytes.
DEMO_MODEL = {"d_model": 256, "n_layers": 4, "n_heads": 4}
DEMO_PROMPT = "It is a truth universally acknowledged"


def run_demo(out_dir: str = "runs/demo", train_seconds: float = 240.0, seed: int = 0) -> dict:
    import hierseq
    from hierseq.data.corpora import load_corpus
    from hierseq.data.tokenizer import ByteTokenizer
    from hierseq.training.trainer import TrainConfig, evaluate, train

    if train_seconds <= 0:
        raise ValueError(f"train_seconds={train_seconds}: must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "transformer"
    started = time.time()
    cfg = TrainConfig(
        model="transformer",
        model_config=dict(DEMO_MODEL),
        seq_len=256,
        batch_size=16,
        max_steps=100_000,  # the time budget ends the run
        max_time_s=train_seconds,
        lr=2e-3,
        warmup_steps=50,
        eval_every=100,
        eval_batches=10,
        save_every=0,
        out_dir=str(run_dir),
        seed=seed,
    )
    print(f"[demo] training the transformer control for {train_seconds:.0f} s on the embedded Austen corpus")
    result = train(cfg)
    model = hierseq.load(run_dir / "final")
    corpus = load_corpus(None)
    test = evaluate(model, corpus.test, seq_len=256, batch_size=16, max_batches=40)
    tok = ByteTokenizer()
    sample_ids = hierseq.generate(
        model, tok.encode(DEMO_PROMPT)[None], max_new_tokens=300, temperature=0.8, top_p=0.95, seed=seed
    )
    sample = tok.decode(sample_ids[0])
    (out / "sample.txt").write_text(sample + "\n")
    summary = {
        "model": "transformer",
        "model_config": DEMO_MODEL,
        "n_params": result["n_params"],
        "steps": result["step"],
        "train_seconds": train_seconds,
        "tokens_per_s": result["tokens_per_s"],
        "val_bpb": result["val_bpb"],
        "test_bpb": test["bpb"],
        "test_tokens": test["tokens"],
        "wall_s": time.time() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot = "transformer/loss.png" if (run_dir / "loss.png").exists() else None
    lines = [
        "# hierseq demo",
        "",
        "Command: `make demo` (= `hierseq demo`). Embedded Austen corpus, byte-level (V=256), split by novel.",
        "",
        "| model | params | steps | train tokens/s | val bits/byte | test bits/byte |",
        "|---|---|---|---|---|---|",
        f"| transformer | {summary['n_params']:,} | {summary['steps']} | {summary['tokens_per_s']:.0f} "
        f"| {summary['val_bpb']:.3f} | {summary['test_bpb']:.3f} |",
        "",
        "Metrics: `transformer/metrics.jsonl`." + (f" Learning curve: ![loss]({plot})" if plot else ""),
        "",
        "## Sample (temperature 0.8, top-p 0.95)",
        "",
        "```",
        sample,
        "```",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    print(
        f"[demo] val {summary['val_bpb']:.3f} bits/byte, test {summary['test_bpb']:.3f} bits/byte, "
        f"{summary['tokens_per_s']:.0f} tokens/s; report: {out / 'report.md'}"
    )
    print(f"[demo] sample:\n{sample}")
    return summary
