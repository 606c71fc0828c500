"""GPT-2 BPE tokenizer (tiktoken "gpt2"), working offline.

tiktoken builds the "gpt2" encoding from two files it downloads from OpenAI's blob storage and caches
under `sha1(url)` in its cache directory. The canonical files ship with this package
(`jaxgpt/assets/gpt2/`), so `get_tokenizer` puts them into that cache first and tiktoken never needs
the network.
"""

import functools
import hashlib
import os
import tempfile
from pathlib import Path

import tiktoken

from jaxgpt.errors import UserError

EOT: int = 50256  # <|endoftext|>, also the document separator in token shards

_ASSETS = Path(__file__).parent / "assets" / "gpt2"
_URL_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# file name -> sha256, the hashes tiktoken_ext.openai_public.gpt2 checks
_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def tiktoken_cache_dir() -> str:
    """The directory tiktoken reads cached files from (same rule as `tiktoken.load.read_file_cached`);
    "" means caching is disabled."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _place_in_cache(cache_dir: str) -> None:
    """Copy the shipped BPE files to `cache_dir/sha1(url)` unless a file with the right hash is there."""
    os.makedirs(cache_dir, exist_ok=True)
    for name, sha256 in _FILES.items():
        target = Path(cache_dir) / hashlib.sha1((_URL_BASE + name).encode()).hexdigest()
        if target.exists() and file_sha256(target) == sha256:
            continue
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes((_ASSETS / name).read_bytes())
        os.replace(tmp, target)


def _encoding_from_assets() -> tiktoken.Encoding:
    """Build the gpt2 encoding straight from the shipped files, for when tiktoken's cache is disabled
    (cache dir ""): tiktoken then reads local paths without caching them."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(_ASSETS / "vocab.bpe"),
        encoder_json_file=str(_ASSETS / "encoder.json"),
        vocab_bpe_hash=_FILES["vocab.bpe"],
        encoder_json_hash=_FILES["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=EOT + 1,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT},
    )


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding (`tiktoken.get_encoding("gpt2")`, vocab 50257, EOT = 50256), no network."""
    cache_dir = tiktoken_cache_dir()
    if cache_dir == "":
        return _encoding_from_assets()
    try:
        _place_in_cache(cache_dir)
    except OSError as e:
        raise UserError(
            f"cannot write the GPT-2 BPE files to tiktoken's cache {cache_dir!r} ({e.strerror}); "
            "set TIKTOKEN_CACHE_DIR to a writable directory"
        ) from e
    return tiktoken.get_encoding("gpt2")
