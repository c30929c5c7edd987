"""Text for calibration, training and evaluation, and its cutting into token blocks.

The default corpus is Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``
(public-domain texts in R's lazy-load format, no R needed). :func:`default_corpus_dir` extracts
them once to plain UTF-8 files. The split is fixed: *Persuasion* (:data:`EVAL_BOOK`) is held out
for evaluation and never trained on; the other five novels (:data:`TRAIN_BOOKS`) are for
calibration and mask learning.

Users bring their own text as a ``.txt`` file, a folder of ``.txt`` files, a ``.jsonl`` file with
a ``"text"`` field, a ``datasets`` folder saved with ``save_to_disk``, or (online) a hub dataset.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

import torch

from mptool.errors import MptoolError
from mptool.io import atomic_dir
from mptool.models import _console, _one_line, looks_like_path

DEBIAN_PACKAGE = "r-cran-janeaustenr"
CORPUS_NAME = "austen"
MANIFEST = "manifest.json"

BOOKS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)
"""The six novels by their janeaustenr names, in publication order; files are ``<slug>.txt``."""

EVAL_BOOK = "persuasion"
"""Held-out book: used only for evaluation (perplexity), never for calibration or training."""

TRAIN_BOOKS = tuple(book for book in BOOKS if book != EVAL_BOOK)
"""The five books used for calibration and mask learning."""

ACCEPTED_DATA = (
    'a .txt file, a folder of .txt files, a .jsonl file with a "text" field, a datasets folder '
    "saved with save_to_disk, or a hub dataset name (online)"
)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {proc.returncode}"


def _download_deb(workdir: Path) -> Path:
    """``apt-get download`` the package into ``workdir`` (``apt-get update`` once if it fails)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise MptoolError(
            f"the default corpus needs apt-get and dpkg-deb (Debian/Ubuntu) to fetch "
            f"{DEBIAN_PACKAGE}; give your own text instead: {ACCEPTED_DATA}"
        )
    proc = _run(["apt-get", "download", DEBIAN_PACKAGE], workdir)
    if proc.returncode != 0:
        _run(["apt-get", "update"], workdir)
        proc = _run(["apt-get", "download", DEBIAN_PACKAGE], workdir)
    debs = sorted(workdir.glob(f"{DEBIAN_PACKAGE}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise MptoolError(
            f"apt-get download {DEBIAN_PACKAGE} failed ({_last_line(proc)}); give your own text "
            f"instead: {ACCEPTED_DATA}"
        )
    return debs[0]


def _read_lazyload_db(rdx: Path) -> dict[str, list[str]]:
    """Read the character vectors of an R lazy-load database (``Rdata.rdx`` + ``Rdata.rdb``).

    The index is a gzip'd RDS list ``variables = {name: (offset, length)}``; each entry of the
    ``.rdb`` is a 4-byte big-endian uncompressed length followed by a zlib stream (or, for
    ``compressed`` 2/3, a type byte and a bzip2/xz stream).
    """
    import rdata

    def parse(raw: bytes) -> Any:
        return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))

    index = parse(gzip.decompress(rdx.read_bytes()))
    compressed = int(index.get("compressed", [1])[0])
    db = rdx.with_suffix(".rdb").read_bytes()
    objects: dict[str, list[str]] = {}
    for name, (offset, length) in index["variables"].items():
        blob = db[int(offset) : int(offset) + int(length)]
        size = struct.unpack(">I", blob[:4])[0]
        if compressed in (2, 3) and blob[4:5] in (b"2", b"X", b"0"):
            kind, body = blob[4:5], blob[5:]
            raw = {b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[kind](body)
        else:
            raw = zlib.decompress(blob[4:])
        if len(raw) != size:
            raise MptoolError(f"corrupt R lazy-load entry {name!r} in {rdx.with_suffix('.rdb')}")
        value = parse(raw)
        objects[str(name)] = [item if isinstance(item, str) else "" for item in list(value)]
    return objects


def _deb_version(deb: Path, workdir: Path) -> str:
    proc = _run(["dpkg-deb", "-f", str(deb), "Version"], workdir)
    return proc.stdout.strip() if proc.returncode == 0 else deb.stem.split("_")[1]


def _corpus_complete(folder: Path) -> bool:
    if not (folder / MANIFEST).is_file():
        return False
    return all((folder / f"{book}.txt").is_file() for book in BOOKS)


def default_corpus_dir(console: Any = None) -> Path:
    """Return the folder of the six Austen novels as UTF-8 text, extracting them once (under a
    lock, so concurrent first uses extract once; see :func:`_extract_corpus`)."""
    from mptool import models
    from mptool.io import cache_lock

    out = models.CACHE_DIR / CORPUS_NAME
    if _corpus_complete(out):
        return out
    with cache_lock(out):
        return _extract_corpus(console)


def _extract_corpus(console: Any = None) -> Path:
    """Return the folder of the six Austen novels as UTF-8 text, extracting them once.

    Downloads the Debian package ``r-cran-janeaustenr`` with ``apt-get download`` (no install,
    no R), unpacks it with ``dpkg-deb -x``, reads its R lazy-load database and writes
    ``CACHE_DIR / "austen" / "<slug>.txt"`` (lines joined with ``"\\n"``) plus ``manifest.json``
    (package version, sha256, line and character counts per book). Written atomically; an
    existing complete folder is reused.

    Args:
        console: a ``rich.console.Console`` for progress; a stderr console when None.

    Returns:
        The corpus folder.

    Raises:
        MptoolError: apt-get/dpkg-deb are missing or the download fails.
    """
    from mptool import models

    out = models.CACHE_DIR / CORPUS_NAME
    if _corpus_complete(out):
        return out
    console = _console(console)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mptool-austen-") as work_str:
        work = Path(work_str)
        with console.status(f"downloading {DEBIAN_PACKAGE} with apt-get"):
            deb = _download_deb(work)
            version = _deb_version(deb, work)
        with console.status(f"unpacking {deb.name} and reading its R data"):
            unpacked = work / "unpacked"
            proc = _run(["dpkg-deb", "-x", str(deb), str(unpacked)], work)
            if proc.returncode != 0:
                raise MptoolError(f"dpkg-deb -x {deb.name} failed: {_last_line(proc)}")
            rdx = next(unpacked.rglob("janeaustenr/data/Rdata.rdx"), None)
            if rdx is None:
                raise MptoolError(f"{deb.name} holds no janeaustenr/data/Rdata.rdx")
            books = _read_lazyload_db(rdx)
        missing = [book for book in BOOKS if book not in books]
        if missing:
            raise MptoolError(f"{deb.name} lacks the novels {missing}")
        with console.status(f"writing the novels to {out}"), atomic_dir(out) as tmp:
            manifest: dict[str, Any] = {
                "source": f"Debian package {DEBIAN_PACKAGE}",
                "package_version": version,
                "eval_book": EVAL_BOOK,
                "train_books": list(TRAIN_BOOKS),
                "books": {},
            }
            for book in BOOKS:
                lines = books[book]
                data = "\n".join(lines).encode("utf-8")
                (tmp / f"{book}.txt").write_bytes(data)
                manifest["books"][book] = {
                    "file": f"{book}.txt",
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "lines": len(lines),
                    "chars": len(data.decode("utf-8")),
                }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    console.log(
        f"Austen corpus ({DEBIAN_PACKAGE} {version}) extracted to {out} "
        f"[dim]({time.perf_counter() - start:.1f} s)[/dim]"
    )
    return out


def default_texts(console: Any = None) -> tuple[str, str]:
    """Return the default ``(train_text, eval_text)``.

    ``train_text`` is the five :data:`TRAIN_BOOKS` joined with blank lines; ``eval_text`` is the
    held-out :data:`EVAL_BOOK` (*Persuasion*).
    """
    folder = default_corpus_dir(console)

    def read(book: str) -> str:
        return (folder / f"{book}.txt").read_text(encoding="utf-8")

    return "\n\n".join(read(book) for book in TRAIN_BOOKS), read(EVAL_BOOK)


def _read_text(path: Path) -> str:
    """A text file's content; undecodable or unreadable files are a one-line user error."""
    try:
        return path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not text
    except UnicodeDecodeError as exc:
        source = "utf-16" if exc.object[:2] in (b"\xff\xfe", b"\xfe\xff") else "latin1"  # a UTF-16 BOM, else a guess
        raise MptoolError(f"data file {path} is not UTF-8 text (byte {exc.start}); convert it, "
                          f"e.g. iconv -f {source} -t utf-8") from None
    except OSError as exc:
        raise MptoolError(f"cannot read data file {path}: {_one_line(exc)}") from None


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(_read_text(path).split("\n"), 1):  # not splitlines: U+2028 is JSON text
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MptoolError(f"line {number} of {path} is not JSON: {exc.msg}") from exc
        if not isinstance(record, dict) or "text" not in record:
            raise MptoolError(f'line {number} of {path} has no "text" field')
        if not isinstance(record["text"], str):
            raise MptoolError(f'line {number} of {path}: "text" is not a string')
        texts.append(record["text"])
    return texts


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()
    )


SPLITS = {"train": ("train",), "eval": ("test", "validation")}
"""Which split of a multi-split dataset is read: training text from ``train``; held-out text
from ``test``, else ``validation`` (never ``train``)."""


def splits_apart(folder: str | os.PathLike) -> bool:
    """Whether a ``datasets`` folder gives training and evaluation different splits (its
    ``dataset_dict.json`` lists ``train`` and ``test`` or ``validation``): then the same folder
    for --data and --eval-data is still held-out evaluation."""
    try:
        splits = json.loads((Path(folder) / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(splits, list) and "train" in splits and any(s in splits for s in SPLITS["eval"])


def _pick_split(data: Any, where: str, role: str) -> Any:
    """The split of a ``DatasetDict`` that ``role`` ("train" or "eval") reads; a single split is
    read whatever its name."""
    import datasets

    if not isinstance(data, datasets.DatasetDict):
        return data
    for name in SPLITS[role]:
        if name in data:
            return data[name]
    if len(data) == 1:
        return next(iter(data.values()))
    raise MptoolError(f"{where} has splits {sorted(data)} and none of {', '.join(SPLITS[role])} "
                      f"for {'training' if role == 'train' else 'held-out evaluation'}")


def _read_saved_dataset(folder: Path, role: str) -> list[str]:
    import datasets

    try:
        data = datasets.load_from_disk(str(folder))
    except Exception as exc:  # an incomplete state.json raises KeyError, a bad arrow file its own types
        raise MptoolError(f"cannot read datasets folder {folder}: {_one_line(exc)}") from exc
    data = _pick_split(data, f"datasets folder {folder}", role)
    if "text" not in data.column_names:
        raise MptoolError(
            f'datasets folder {folder} has no "text" column (columns: {data.column_names})'
        )
    return [text for text in data["text"] if isinstance(text, str)]


def _read_hub_dataset(name: str, role: str) -> list[str]:
    import datasets

    from mptool.models import hub_unreachable

    if why := hub_unreachable(reads_cache=True):
        raise MptoolError(f"data {name} is no local path, and {why} to load it as a hub dataset "
                          f"(HF_HUB_OFFLINE=1 reads a cached copy); give {ACCEPTED_DATA}")
    try:
        data = datasets.load_dataset(name, split="train") if role == "train" else datasets.load_dataset(name)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure is the user's to fix
        raise MptoolError(
            f"cannot load hub dataset {name!r} ({_one_line(exc)}); offline, give {ACCEPTED_DATA}"
        ) from exc
    data = _pick_split(data, f"hub dataset {name}", role)
    if "text" not in data.column_names:
        raise MptoolError(f'hub dataset {name} has no "text" column ({data.column_names})')
    return [text for text in data["text"] if isinstance(text, str)]


def load_texts(path_or_name: str | os.PathLike, role: str = "train") -> list[str]:
    """Load user text as a list of documents.

    Args:
        path_or_name: a ``.txt`` (``.text``, ``.md``) file (one document), a folder of ``.txt``
            files (one document each, sorted by name), a ``.jsonl`` file (field ``"text"`` per
            line), a ``datasets`` folder saved with ``save_to_disk`` (column ``"text"``), or a
            hub dataset name (``datasets.load_dataset``, needs network).
        role: "train" reads a multi-split dataset's ``train`` split; "eval" its ``test`` or
            ``validation`` split (:data:`SPLITS`).

    Returns:
        The documents, whitespace-only ones dropped.

    Raises:
        MptoolError: a missing path, an unsupported file, a missing ``"text"`` field or column,
            or no non-whitespace text at all.
    """
    spec = os.fspath(path_or_name)
    path = Path(spec).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            texts = _read_jsonl(path)
        elif suffix in (".txt", ".text", ".md"):
            texts = [_read_text(path)]
        else:
            raise MptoolError(f"data file {spec} is not .txt, .text, .md or .jsonl; give {ACCEPTED_DATA}")
    elif path.is_dir():
        if _is_saved_dataset(path):
            texts = _read_saved_dataset(path, role)
        else:
            files = sorted(f for f in path.iterdir() if f.suffix.lower() == ".txt" and f.is_file())
            if not files:
                raise MptoolError(
                    f"data folder {spec} holds no .txt files and is no saved dataset; "
                    f"give {ACCEPTED_DATA}"
                )
            texts = [_read_text(f) for f in files]
    elif path.exists():  # a device, a pipe, a socket
        raise MptoolError(f"data path {spec} is not a regular file or folder; give {ACCEPTED_DATA}")
    elif not isinstance(path_or_name, str) or looks_like_path(spec):
        raise MptoolError(f"data path {spec} does not exist; give {ACCEPTED_DATA}")
    else:
        texts = _read_hub_dataset(spec, role)
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise MptoolError(f"data {spec} is empty (no non-whitespace text); give {ACCEPTED_DATA}")
    return texts


_CUT_MARGIN = 64
"""Tokens dropped before a character cut; tokenization only changes next to where text is cut."""


def _encode(tokenizer: Any, text: str, n_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` without special tokens; only its first ``n_tokens`` when given.

    With a cap, growing character prefixes are tokenized instead of the whole text (a 1 M-token
    corpus takes seconds); ids within ``_CUT_MARGIN`` tokens of the cut are discarded, so the
    result equals the head of the full tokenization.
    """

    def encode(part: str) -> list[int]:
        # verbose=False: long corpora exceed model_max_length on purpose (we cut blocks ourselves)
        return tokenizer(part, add_special_tokens=False, verbose=False)["input_ids"]

    if n_tokens is None:
        return encode(text)
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    chars = max(4096, 8 * (n_tokens + _CUT_MARGIN))
    while chars < len(text):
        ids = encode(text[:chars])
        if len(ids) >= n_tokens + _CUT_MARGIN:
            return ids[:n_tokens]
        chars *= 2
    return encode(text)[:n_tokens]


DATA_ORDERS = ("sequential", "shuffled")
"""How training and calibration blocks are drawn from the text (``data.order``)."""

SHUFFLE_POOL_TOKENS = 1 << 22
"""``order="shuffled"`` draws its blocks from the text's first this many tokens (4 M: all of the
Austen corpus, and a bound on tokenization time for a large user corpus)."""


def token_blocks(
    tokenizer: Any,
    texts: str | Sequence[str],
    seq_len: int,
    max_tokens: int | None,
    offset_tokens: int = 0,
    order: str = "sequential",
) -> torch.Tensor:
    """Cut text into full, non-overlapping blocks of token ids.

    Documents are joined with the tokenizer's EOS token text (``"\\n\\n"`` without one) and
    tokenized without added special tokens; the first ``offset_tokens`` tokens are skipped, then
    at most ``max_tokens`` tokens are cut into blocks of ``seq_len``; a partial last block is
    dropped. With ``order="shuffled"`` the text after the offset (up to
    :data:`SHUFFLE_POOL_TOKENS` tokens) is cut into blocks first and ``max_tokens`` worth of them
    are drawn in a fixed random order (seed 0, whatever the run's seed), so a small budget
    samples the whole corpus instead of its first document; the first ``k`` blocks of a call are
    the first ``k`` of any other call with a larger ``max_tokens`` (calibration blocks are the
    first training blocks, as in sequential order).

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: one text or a list of documents.
        seq_len: tokens per block.
        max_tokens: cap on the tokens used (after the offset); None for all.
        offset_tokens: tokens to skip first (e.g. to keep calibration and training disjoint, in
            sequential order; in shuffled order the pool starts after the offset, so a shuffled
            call with ``max_tokens=C`` and one with ``offset_tokens=C`` can share text).

    Returns:
        ``torch.LongTensor`` of shape ``[n_blocks, seq_len]``.

    Raises:
        MptoolError: fewer tokens than one full block.
    """
    if seq_len < 1 or offset_tokens < 0:
        raise MptoolError(f"seq_len must be >= 1 and offset >= 0 (got {seq_len}, {offset_tokens})")
    if order not in DATA_ORDERS:
        raise MptoolError(f"data order {order!r} is not one of {', '.join(DATA_ORDERS)}")
    docs = [texts] if isinstance(texts, str) else list(texts)
    separator = getattr(tokenizer, "eos_token", None) or "\n\n"
    shuffled = order == "shuffled"
    if shuffled:
        cap: int | None = offset_tokens + SHUFFLE_POOL_TOKENS
    else:
        cap = None if max_tokens is None else offset_tokens + max_tokens
    ids = _encode(tokenizer, separator.join(docs), cap)[offset_tokens:]
    pool = len(ids) // seq_len
    n_blocks = pool if max_tokens is None else min(pool, max_tokens // seq_len)
    if n_blocks < 1:
        raise MptoolError(
            f"the data gives {len(ids)} tokens after skipping {offset_tokens} "
            f"(cap {max_tokens}); need at least one block of {seq_len}: give more text or a "
            "smaller sequence length"
        )
    if shuffled:
        blocks = torch.tensor(ids[: pool * seq_len], dtype=torch.long).view(pool, seq_len)
        return blocks[torch.randperm(pool, generator=torch.Generator().manual_seed(0))[:n_blocks]]
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def eval_token_stream(
    tokenizer: Any, text: str | Sequence[str], max_tokens: int | None
) -> torch.Tensor:
    """Tokenize evaluation text into one 1-D stream of ids (for sliding-window perplexity).

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: the evaluation text (a list of documents is joined as in :func:`token_blocks`).
        max_tokens: keep at most this many tokens; None for all.

    Returns:
        ``torch.LongTensor`` of shape ``[n]``.

    Raises:
        MptoolError: the text gives fewer than two tokens.
    """
    if not isinstance(text, str):
        text = (getattr(tokenizer, "eos_token", None) or "\n\n").join(text)
    ids = _encode(tokenizer, text, max_tokens)
    if len(ids) < 2:
        raise MptoolError(f"evaluation text gives {len(ids)} tokens; perplexity needs at least 2")
    return torch.tensor(ids, dtype=torch.long)
