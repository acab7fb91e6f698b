"""`braid extract` and `braid elastic sweep` (registered on the main parser by `register`)."""

from __future__ import annotations

import argparse


def _floats(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of widths, e.g. 1,0.5") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer indices, e.g. 3,5") from None


def cmd_extract(args: argparse.Namespace) -> int:
    from braid.elastic.extract import extract_checkpoint

    report = extract_checkpoint(
        args.ckpt, args.out, args.width, args.widths_per_layer, args.drop_layers, args.heads, args.heads_per_layer
    )
    print(
        f"wrote {report['out']} (pattern {report['pattern']!r}): {report['params_extracted']:,} parameters "
        f"(source {report['params_source']:,}), {report['bytes_extracted']:,} bytes on disk "
        f"(source checkpoint with optimizer state {report['bytes_source']:,})"
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from braid.elastic.sweep import sweep

    result = sweep(args.ckpt, args.data, args.out, args.batches, args.heads)
    for row in result["front"]:
        print(f"pareto: {row['name']:<16} {row['params']:>10,} params  val_loss {row['val_loss']:.4f}")
    print(f"wrote {result['csv']} and {result['png']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "extract", help="extract a standalone elastic submodel (sliced FFNs and mixer heads, dropped layers)"
    )
    p.add_argument("ckpt", help="a run dir (its latest checkpoint) or a checkpoint dir")
    widths = p.add_mutually_exclusive_group()
    widths.add_argument("--width", type=float, help="one granularity for every MatFormer layer, e.g. 0.5 (default 1)")
    widths.add_argument(
        "--widths-per-layer", type=_floats, help="one granularity per MatFormer ('F') layer, e.g. 1,0.5,0.25"
    )
    heads = p.add_mutually_exclusive_group()
    heads.add_argument(
        "--heads", type=float,
        help="fraction of KV heads (attention) and B/C groups (Mamba-2) every such layer keeps, e.g. 0.5 (default 1)",
    )
    heads.add_argument(
        "--heads-per-layer", type=_floats, help="one heads fraction per attention / Mamba-2 layer, e.g. 0.5,1,1"
    )
    p.add_argument("--drop-layers", type=_ints, default=[], help="layer indices to remove, e.g. 3,5")
    p.add_argument("--out", required=True, help="new run dir for the submodel (eval/generate take it)")
    p.set_defaults(func=cmd_extract)
    elastic = sub.add_parser("elastic", help="elastic (MatFormer) submodel tools").add_subparsers(
        dest="elastic_command", required=True
    )
    p = elastic.add_parser("sweep", help="val loss vs parameters of uniform and Mix'n'Match submodels")
    p.add_argument("ckpt", help="a run dir (its latest checkpoint) or a checkpoint dir")
    p.add_argument("--data", required=True, help="prepared data dir whose val split to use")
    p.add_argument("--out", help="output dir for sweep.csv and pareto.png (default RUN/elastic)")
    p.add_argument("--batches", type=int, default=8, help="val batches per submodel")
    p.add_argument(
        "--heads", type=_floats, help="nested-heads fractions to sweep, e.g. 0.5,1 (default: the run's elastic.heads)"
    )
    p.set_defaults(func=cmd_sweep)
