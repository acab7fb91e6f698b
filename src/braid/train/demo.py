"""`braid demo`: corpus → tokenizer → shards → tiny-hybrid on CPU → report, in minutes.

Each stage is skipped when its output exists, so a second run reports on the finished
run (or resumes an interrupted one) without fetching or training again.
"""

from __future__ import annotations

from pathlib import Path

DEMO_VOCAB_SIZE = 4096
DEMO_PROMPT = "KING HENRY. My lords,"


def ensure_demo_data(data_dir: Path) -> Path:
    """Prepared Gutenberg shards in `data_dir`, with a 4096-token byte-level BPE.

    The raw text and the tokenizer go to the sibling dir `<data_dir>-corpus`.
    """
    from braid.data import download_corpus, load_manifest, train_tokenizer
    from braid.data.prepare import prepare

    if (data_dir / "manifest.json").is_file():
        load_manifest(data_dir)
        return data_dir
    corpus_dir = data_dir.with_name(data_dir.name + "-corpus")
    print(f"demo: fetching the Gutenberg corpus into {corpus_dir}")
    files = download_corpus("gutenberg", corpus_dir)
    tokenizer = corpus_dir / "tokenizer.json"
    if not tokenizer.is_file():
        print(f"demo: training a byte-level BPE tokenizer ({DEMO_VOCAB_SIZE} tokens)")
        train_tokenizer(files, DEMO_VOCAB_SIZE, tokenizer)
    print(f"demo: tokenizing into MDS shards at {data_dir}")
    prepare(files, data_dir, tokenizer, val_fraction=0.05)
    return data_dir


def run_demo(out_dir: str, data_dir: str, overrides: list[str]) -> int:
    """Prepare the data, train tiny-hybrid on the CPU, print val loss vs the unigram baseline."""
    from braid.data import load_tokenizer, unigram_baseline
    from braid.train.config import apply_overrides, load_config
    from braid.train.evaluate import sample_text
    from braid.train.trainer import Trainer

    cfg = load_config("tiny-hybrid", [f"out_dir={out_dir}", "train.device=cpu", *overrides])
    prepared = ensure_demo_data(Path(data_dir))  # after the config: a bad override fails first
    cfg = apply_overrides(cfg, [f"data.path={prepared}"])
    trainer = Trainer(cfg)
    summary = trainer.fit()
    if summary["stopped_by"]:
        print(f"demo stopped by {summary['stopped_by']} at step {summary['step']}; run it again to resume")
        return 0
    baseline = unigram_baseline(prepared)
    sample = sample_text(trainer.model, load_tokenizer(prepared), DEMO_PROMPT, 48, 0.8, 40, cfg.train.seed)
    print(
        f"\nvalidation loss {summary['val_loss']:.3f} nats/token (perplexity {summary['val_ppl']:.1f}); "
        f"unigram baseline of the same tokenizer {baseline:.3f} nats/token "
        f"({'beaten by' if summary['val_loss'] < baseline else 'NOT beaten, short by'} "
        f"{abs(baseline - summary['val_loss']):.3f})"
    )
    print(f"sample (temperature 0.8, top-k 40):\n{sample}\n")
    print(f"run dir {summary['run_dir']} (metrics.jsonl, config.yaml, ckpt/); try:")
    print(f"  braid generate {summary['run_dir']} --prompt 'ROMEO.' --max-new-tokens 64")
    print(f"  braid plot {summary['run_dir']}")
    return 0
