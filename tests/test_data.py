"""Loading user text and cutting it into token blocks (offline, tiny tokenizer)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import SAMPLE_TEXT
from mptool import data
from mptool.data import EVAL_BOOK, TRAIN_BOOKS, eval_token_stream, load_texts, token_blocks
from mptool.errors import MptoolError


@pytest.fixture
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_txt_file_is_one_document(text_file):
    texts = load_texts(str(text_file))
    assert texts == [SAMPLE_TEXT * 40]


def test_folder_of_txt_files_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.txt").write_text("  \n")  # whitespace-only documents are dropped
    (tmp_path / "notes.md").write_text("ignored")
    assert load_texts(tmp_path) == ["first", "second"]


def test_jsonl_text_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate("xyz")) + "\n\n")
    assert load_texts(str(p)) == ["x", "y", "z"]


def test_a_byte_order_mark_is_not_part_of_the_text(tmp_path):
    """Windows editors start UTF-8 files with a BOM; it would break the first JSON line."""
    p = tmp_path / "d.jsonl"
    p.write_bytes("\ufeff".encode() + b'{"text": "x"}\n{"text": "y"}\n')
    assert load_texts(str(p)) == ["x", "y"]
    t = tmp_path / "t.txt"
    t.write_bytes("\ufeff".encode() + b"plain")
    assert load_texts(str(t)) == ["plain"]


def test_jsonl_without_text_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no"}) + "\n")
    with pytest.raises(MptoolError, match='line 2 .* no "text" field'):
        load_texts(str(p))


@pytest.mark.parametrize("as_dict", [False, True])
def test_saved_datasets_folder(tmp_path, as_dict):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["one", "two", ""], "n": [1, 2, 3]})
    if as_dict:
        ds = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_texts(str(tmp_path / "ds")) == ["one", "two"]
    # held-out text comes from the test split, never from train (a single split is read whole)
    assert load_texts(str(tmp_path / "ds"), role="eval") == (["one"] if as_dict else ["one", "two"])


def test_held_out_text_needs_a_test_or_validation_split(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["one", "two"]})
    datasets.DatasetDict({"train": ds, "extra": ds}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(MptoolError, match=r"splits \['extra', 'train'\] and none of test, validation"):
        load_texts(str(tmp_path / "ds"), role="eval")


def test_unreadable_text_is_one_line(tmp_path):
    (tmp_path / "latin.txt").write_bytes("Anne Elliot, na\xefve".encode("latin-1"))
    with pytest.raises(MptoolError, match="is not UTF-8 text .*iconv -f latin1 -t utf-8"):
        load_texts(str(tmp_path / "latin.txt"))
    (tmp_path / "wide.txt").write_bytes("Anne Elliot".encode("utf-16"))  # with its byte-order mark
    with pytest.raises(MptoolError, match="is not UTF-8 text .*iconv -f utf-16 -t utf-8"):
        load_texts(str(tmp_path / "wide.txt"))
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.TXT").write_text("Emma Woodhouse, handsome, clever and rich")
    (folder / "b.txt").mkdir()  # a folder named like a text file is not read
    assert load_texts(str(folder)) == ["Emma Woodhouse, handsome, clever and rich"]
    jsonl = tmp_path / "sep.jsonl"
    jsonl.write_text(json.dumps({"text": "one\u2028two"}, ensure_ascii=False) + "\n")
    assert load_texts(str(jsonl)) == ["one\u2028two"]  # U+2028 inside a JSON string is not a line break


def test_a_negative_token_cap_is_refused(tokenizer):
    with pytest.raises(ValueError, match="n_tokens must be >= 0"):
        eval_token_stream(tokenizer, SAMPLE_TEXT * 20, -5)


def test_saved_dataset_without_text_column(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(MptoolError, match='no "text" column'):
        load_texts(str(tmp_path / "ds"))


def test_an_incomplete_datasets_folder_is_one_line(tmp_path):
    import json

    folder = tmp_path / "ds"
    folder.mkdir()
    for name in ("state.json", "dataset_info.json"):  # what load_from_disk takes for a saved dataset
        (folder / name).write_text(json.dumps({}))
    with pytest.raises(MptoolError, match=f"cannot read datasets folder {folder}: "):
        load_texts(str(folder))


def test_empty_file(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text(" \n\t\n")
    with pytest.raises(MptoolError, match="data .*empty.txt is empty"):
        load_texts(str(p))


@pytest.mark.parametrize(
    "name", ["./nope.txt", "/no/such/corpus", "~/no-such-corpus-dir", "x.jsonl"]
)
def test_missing_path(name):
    with pytest.raises(MptoolError, match="does not exist; give a .txt file") as err:
        load_texts(name)
    assert "\n" not in str(err.value)


def test_a_device_or_pipe_is_named_as_such(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for spec in ("/dev/null", str(fifo)):
        with pytest.raises(MptoolError, match=f"data path {spec} is not a regular file or folder; give a .txt"):
            load_texts(spec)


def test_unsupported_file(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text\nhello\n")
    with pytest.raises(MptoolError, match=r"not \.txt, \.text, \.md or \.jsonl"):
        load_texts(str(p))


def test_token_blocks_shapes(tokenizer):
    text = SAMPLE_TEXT * 40
    full = eval_token_stream(tokenizer, text, None)
    blocks = token_blocks(tokenizer, text, seq_len=32, max_tokens=320)
    assert blocks.dtype == torch.long and blocks.shape == (10, 32)
    assert torch.equal(blocks.flatten(), full[:320])
    # partial last block dropped; offset skips tokens; no cap uses everything
    blocks = token_blocks(tokenizer, text, seq_len=50, max_tokens=149, offset_tokens=7)
    assert blocks.shape == (2, 50) and torch.equal(blocks.flatten(), full[7:107])
    blocks = token_blocks(tokenizer, text, seq_len=64, max_tokens=None)
    assert blocks.shape == (full.numel() // 64, 64)


def test_token_blocks_prefix_matches_full_tokenization(tokenizer):
    """A capped call tokenizes only a prefix of long text, with the same ids as the full text."""
    text = SAMPLE_TEXT * 400  # ~280 k characters
    full = eval_token_stream(tokenizer, text, None)
    for offset in (0, 1, 5000):
        blocks = token_blocks(tokenizer, text, seq_len=128, max_tokens=1000, offset_tokens=offset)
        assert torch.equal(blocks.flatten(), full[offset : offset + 896])


def test_token_blocks_joins_documents_with_eos(tokenizer):
    blocks = token_blocks(tokenizer, ["Emma Woodhouse", "Sir Walter"], seq_len=1, max_tokens=None)
    assert tokenizer.eos_token_id in blocks.flatten().tolist()
    assert tokenizer.decode(blocks.flatten()) == "Emma Woodhouse</s>Sir Walter"


def test_token_blocks_too_short(tokenizer):
    with pytest.raises(MptoolError, match="need at least one block of 4096"):
        token_blocks(tokenizer, "a short text", seq_len=4096, max_tokens=None)
    with pytest.raises(MptoolError, match="after skipping"):
        token_blocks(tokenizer, SAMPLE_TEXT, seq_len=8, max_tokens=100, offset_tokens=10**6)


def test_shuffled_blocks_sample_the_whole_text(tokenizer):
    """order="shuffled": whole blocks of the full stream, drawn in one fixed order from all of it;
    a smaller budget takes the first blocks of a larger one (calibration = first training blocks)."""
    docs = [" ".join(f"chapter {d} line {i}." for i in range(120)) for d in range(6)]  # no two blocks alike
    full = token_blocks(tokenizer, docs, seq_len=32, max_tokens=None)
    index = {tuple(b.tolist()): i for i, b in enumerate(full)}
    assert len(index) == len(full) > 80
    few = token_blocks(tokenizer, docs, seq_len=32, max_tokens=8 * 32, order="shuffled")
    many = token_blocks(tokenizer, docs, seq_len=32, max_tokens=40 * 32, order="shuffled")
    assert few.shape == (8, 32) and many.shape == (40, 32)
    assert torch.equal(many[:8], few)
    assert torch.equal(few, token_blocks(tokenizer, docs, seq_len=32, max_tokens=8 * 32, order="shuffled"))
    positions = [index[tuple(b.tolist())] for b in many]
    assert len(set(positions)) == len(positions)  # distinct blocks of the sequential cut
    assert max(positions[:8]) >= 8  # not just the text's first blocks
    assert max(positions) > len(full) // 2  # reaches the second half of the corpus
    # an offset skips the same tokens in both orders; no cap draws every block once
    every = token_blocks(tokenizer, docs, seq_len=32, max_tokens=None, order="shuffled")
    assert sorted(index[tuple(b.tolist())] for b in every) == list(range(len(full)))
    skipped = token_blocks(tokenizer, docs, seq_len=32, max_tokens=None, offset_tokens=64, order="shuffled")
    assert sorted(index[tuple(b.tolist())] for b in skipped) == list(range(2, len(full)))
    with pytest.raises(MptoolError, match="data order 'random' is not one of sequential, shuffled"):
        token_blocks(tokenizer, docs, seq_len=32, max_tokens=None, order="random")


def test_eval_token_stream(tokenizer):
    ids = eval_token_stream(tokenizer, SAMPLE_TEXT * 10, 100)
    assert ids.shape == (100,) and ids.dtype == torch.long
    with pytest.raises(MptoolError, match="at least 2"):
        eval_token_stream(tokenizer, "", None)


def test_split_is_fixed():
    assert EVAL_BOOK == "persuasion"
    assert EVAL_BOOK not in TRAIN_BOOKS and len(TRAIN_BOOKS) == 5
    assert set(TRAIN_BOOKS) | {EVAL_BOOK} == set(data.BOOKS)


@pytest.mark.slow
def test_default_corpus():
    """Needs apt-get (network on first use); later runs reuse the cache."""
    folder = data.default_corpus_dir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["books"]) == set(data.BOOKS)
    for book, info in manifest["books"].items():
        text = (folder / f"{book}.txt").read_text(encoding="utf-8")
        assert len(text) == info["chars"] and text.count("\n") + 1 == info["lines"]
    train, held_out = data.default_texts()
    assert held_out.startswith("Persuasion") and "Sir Walter Elliot" in held_out
    assert "Sir Walter Elliot" not in train and "Emma Woodhouse" in train
    assert len(train) > 3_000_000 and len(held_out) > 400_000
