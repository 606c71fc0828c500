"""GPT-2 tokenizer: known ids, round trip, and offline use with an empty tiktoken cache."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from jaxgpt.tokenizer import _FILES, _URL_BASE, EOT, _place_in_cache, get_tokenizer

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter with every network connection failing.
BLOCK_NETWORK = """
import socket
def blocked(*args, **kwargs):
    raise OSError("network blocked by the test")
socket.socket.connect = socket.socket.connect_ex = blocked
socket.create_connection = socket.getaddrinfo = blocked
"""
ENCODE_HELLO = """
from jaxgpt.tokenizer import get_tokenizer
assert get_tokenizer().encode("Hello world") == [15496, 995]
"""


def run_offline(code: str, cache_dir: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DATA_GYM_CACHE_DIR"}
    env["TIKTOKEN_CACHE_DIR"] = cache_dir
    return subprocess.run(
        [sys.executable, "-c", BLOCK_NETWORK + code], env=env, cwd=ROOT, capture_output=True, text=True
    )


def test_known_ids_and_round_trip():
    enc = get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == EOT == 50256
    text = "To be, or not to be: that is the question.\n  Whether 'tis nobler — in the mind?"
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert get_tokenizer() is enc  # cached


def test_works_offline_with_an_empty_cache(tmp_path):
    cache = tmp_path / "tiktoken-cache"
    done = run_offline(ENCODE_HELLO, str(cache))
    assert done.returncode == 0, done.stderr
    expected = {hashlib.sha1((_URL_BASE + name).encode()).hexdigest() for name in _FILES}
    assert {p.name for p in cache.iterdir()} == expected


def test_plain_tiktoken_fails_offline_with_an_empty_cache(tmp_path):
    """Control for the test above: without our cache placement the blocked network is noticed."""
    done = run_offline("import tiktoken; tiktoken.get_encoding('gpt2')", str(tmp_path / "empty"))
    assert done.returncode != 0
    assert "network blocked by the test" in done.stderr


def test_works_with_caching_disabled(tmp_path):
    done = run_offline(ENCODE_HELLO, "")
    assert done.returncode == 0, done.stderr


def test_corrupt_cache_file_is_replaced(tmp_path):
    target = tmp_path / hashlib.sha1((_URL_BASE + "vocab.bpe").encode()).hexdigest()
    target.write_bytes(b"not the vocab")
    _place_in_cache(str(tmp_path))
    assert hashlib.sha256(target.read_bytes()).hexdigest() == _FILES["vocab.bpe"]
    assert not list(tmp_path.glob("*.tmp"))
