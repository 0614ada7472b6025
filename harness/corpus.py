"""Text corpora for key statistics: reading a corpus and tokenising it into samples.

A corpus is a text file or an ``hf:<name>[:config][:split]`` dataset (:func:`resolve_corpus`),
identified by a SHA-256 (:class:`Corpus`); :mod:`harness.stats` turns its samples into second
moments.

Sampling (``sampling``, part of the cache identity):

* ``"records"`` / ``"lines"`` (the original's: ROME/MEMIT/AlphaEdit ``layer_stats``, there
  ``mom2_n_samples`` Wikipedia records): ``n_records`` records, each tokenised on its own with
  the tokenizer's default special tokens (a BOS where the tokenizer adds one, e.g. Llama 3;
  none for GPT-2 or SmolLM2) and truncated to the model's context length
  (:func:`context_length`); every position of every record is a sample, ``N`` = their total.
  A record is a WikiText article (``records``: a `` = Title = `` heading up to the next one,
  :func:`split_articles`; the analogue of a Wikipedia article) or a non-blank line
  (``lines``: a row of Hugging Face's wikitext, as the original reads ``wikitext``); of an
  ``hf:`` dataset, a row. With fewer records than requested, all are used (a warning; the
  count used is in the key and the metadata); otherwise the original's fixed subset
  (``random.Random(1).shuffle``, first ``n_records``; :func:`select_records`). Records run
  longest first in right-padded batches; padding positions are masked out.
* ``"tokens"`` (this harness's earlier scheme): the corpus is read line by line, each line
  tokenised without special tokens, the ids concatenated and cut after ``n_tokens``. The
  stream is cut into consecutive chunks of ``seq_len`` positions; if the tokenizer adds a BOS
  token to its inputs, every chunk starts with BOS and holds ``seq_len - 1`` corpus tokens, and
  the BOS position is context only (not a sample). Every corpus token is exactly one sample;
  there is no padding. The last chunk may be shorter and runs in its own batch.

"""

from __future__ import annotations

import hashlib
import os
import random
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from harness.errors import UserError
from harness.models import LoadedModel, sha256_file
from harness.paths import data_dir

DEFAULT_CORPUS = Path("wikitext-2") / "valid.txt"
_TOKENIZE_LINES = 512  # lines per tokenizer call


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """A text source: ``name`` (path or ``hf:`` spec) and ``sha256`` (its identity).

    For a file the hash is the SHA-256 of its bytes; for a Hugging Face dataset it is the
    SHA-256 of the normalised spec ``hf:<name>:<config>:<split>`` (the hub's data is not hashed).
    """

    name: str
    sha256: str
    path: Path | None = None
    hf: tuple[str, str | None, str] | None = None

    def lines(self) -> Iterator[str]:
        """The text, one line (or dataset record) at a time, each ending in a newline."""
        if self.path is not None:
            with open(self.path, encoding="utf-8-sig") as f:
                yield from f
            return
        for text in self.rows():
            yield text if text.endswith("\n") else text + "\n"

    def rows(self) -> Iterator[str]:
        """The non-empty texts of a Hugging Face dataset's rows, as stored."""
        assert self.hf is not None
        ds = _load_hf(*self.hf)
        column: str | None = None
        for rec in ds:
            if column is None:
                column = _text_column(rec, self.name)
            text = rec[column]
            if text:
                yield text


def default_corpus_path() -> Path:
    """``<data dir>/wikitext-2/valid.txt`` (the data dir of :func:`harness.paths.data_dir`)."""
    return data_dir() / DEFAULT_CORPUS


def resolve_corpus(corpus: str | Path | None = None) -> Corpus:
    """Turn ``None`` (WikiText-2 validation), a text file path or ``hf:<name>[:config][:split]``
    into a :class:`Corpus`; raises :class:`UserError` for a missing file."""
    if isinstance(corpus, str) and corpus.startswith("hf:"):
        parts = corpus[3:].split(":")
        if not parts[0] or len(parts) > 3:
            raise UserError(f"corpus {corpus!r}: expected 'hf:<name>[:config][:split]'")
        name = parts[0]
        config = parts[1] if len(parts) > 1 and parts[1] else None
        split = parts[2] if len(parts) > 2 and parts[2] else "train"
        spec = f"hf:{name}:{config or ''}:{split}"
        return Corpus(name=spec, sha256=hashlib.sha256(spec.encode()).hexdigest(),
                      hf=(name, config, split))
    if corpus is None:
        path = default_corpus_path()
        if not path.is_file():
            raise UserError(
                f"default statistics corpus {path} not found (it is <data dir>/"
                f"{DEFAULT_CORPUS.as_posix()}; KEH_DATA_DIR="
                f"{os.environ.get('KEH_DATA_DIR', '<unset>')}); run `keh data fetch wikitext`, "
                f"set KEH_DATA_DIR, or pass a text file or 'hf:<name>[:config][:split]' as the "
                f"corpus"
            )
    else:
        path = Path(corpus).expanduser()
        if not path.is_file():
            raise UserError(f"statistics corpus file {path} does not exist (pass a text file "
                            f"or 'hf:<name>[:config][:split]')")
    return Corpus(name=str(path.resolve()), sha256=sha256_file(path), path=path)


def _load_hf(name: str, config: str | None, split: str) -> Any:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise UserError("an 'hf:' corpus needs the datasets package") from exc
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        offline = any(os.environ.get(k) == "1" for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        why = ("offline mode is set (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE=1)" if offline
               else "the Hugging Face hub may be unreachable")
        raise UserError(
            f"could not load Hugging Face dataset {name!r} (config {config!r}, split {split!r}) "
            f"for the statistics corpus: {why}; an 'hf:' corpus needs network access, otherwise "
            f"pass a local text file ({type(exc).__name__}: {detail})"
        ) from exc


def _text_column(rec: dict[str, Any], name: str) -> str:
    if isinstance(rec.get("text"), str):
        return "text"
    for k, v in rec.items():
        if isinstance(v, str):
            return k
    raise UserError(f"dataset {name} has no text column (fields: {', '.join(rec)})")


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenChunks:
    """The corpus as model inputs.

    ``chunks``: 1-D int64 tensors of length ``<= seq_len``, each ``n_prefix`` context positions
    (0, or 1 for a BOS token) followed by corpus tokens. ``n_tokens``: the number of corpus
    tokens over all chunks (= the number of samples).
    """

    chunks: list[Tensor]
    n_prefix: int
    n_tokens: int
    seq_len: int

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """Consecutive chunks of equal length stacked into ``(b, T)`` with ``b <= batch_size``."""
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1 (got {batch_size})")
        i = 0
        while i < len(self.chunks):
            length = self.chunks[i].numel()
            j = i
            while j < len(self.chunks) and j - i < batch_size and \
                    self.chunks[j].numel() == length:
                j += 1
            yield torch.stack(self.chunks[i:j])
            i = j


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_id]`` if the tokenizer adds a BOS token to plain inputs, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def tokenize_corpus(tokenizer: Any, corpus: Corpus, n_tokens: int, seq_len: int) -> TokenChunks:
    """Tokenise the first ``n_tokens`` tokens of ``corpus`` and cut them into chunks.

    Lines are tokenised in batches without special tokens and concatenated; reading stops once
    ``n_tokens`` ids are collected. Fewer available tokens give a warning and all of them are
    used. Chunks hold ``seq_len - n_prefix`` corpus tokens each (the last may hold fewer).
    """
    if n_tokens < 1:
        raise UserError(f"n_tokens must be at least 1 (got {n_tokens})")
    prefix = _bos_prefix(tokenizer)
    if seq_len <= len(prefix):
        raise UserError(f"seq_len must exceed {len(prefix)} (got {seq_len})")
    ids: list[int] = []
    buf: list[str] = []

    def flush() -> None:
        enc = tokenizer(buf, add_special_tokens=False, verbose=False)["input_ids"]
        for row in enc:
            ids.extend(row)
        buf.clear()

    for line in corpus.lines():
        buf.append(line)
        if len(buf) >= _TOKENIZE_LINES:
            flush()
            if len(ids) >= n_tokens:
                break
    if buf:
        flush()
    if not ids:
        raise UserError(f"statistics corpus {corpus.name} holds no text")
    if len(ids) < n_tokens:
        warnings.warn(f"statistics corpus {corpus.name} has only {len(ids)} tokens "
                      f"(< n_tokens={n_tokens}); using all of them", stacklevel=2)
    flat = torch.tensor(ids[:n_tokens], dtype=torch.long)
    step = seq_len - len(prefix)
    head = torch.tensor(prefix, dtype=torch.long)
    chunks = [torch.cat([head, part]) for part in flat.split(step)]
    return TokenChunks(chunks=chunks, n_prefix=len(prefix), n_tokens=flat.numel(),
                       seq_len=seq_len)


def corpus_chunks(lm: LoadedModel, corpus: str | Path | None = None, n_tokens: int = 100_000,
                  seq_len: int = 256) -> TokenChunks:
    """:func:`tokenize_corpus` for ``lm``'s tokenizer and a corpus spec (see module doc)."""
    return tokenize_corpus(lm.tokenizer, resolve_corpus(corpus), n_tokens, seq_len)


# ---------------------------------------------------------------------------------------------
# Records (the original's sampling: whole records, each its own sequence)
# ---------------------------------------------------------------------------------------------

#: the values of ``stats_sampling`` (:func:`check_sampling`)
SAMPLING_MODES = ("records", "lines", "tokens")
#: seed of the original's record subset (``tally(..., random_sample=1)`` in ROME's layer_stats)
RECORD_SUBSET_SEED = 1
_TOP_HEADING = re.compile(r"^ = [^=].* = $")


def check_sampling(sampling: str) -> str:
    """``sampling`` if it is one of :data:`SAMPLING_MODES`, else a one-line UserError."""
    if sampling not in SAMPLING_MODES:
        raise UserError(f"stats_sampling {sampling!r} is not one of {', '.join(SAMPLING_MODES)}")
    return sampling


def split_articles(lines: Iterable[str]) -> list[str]:
    """WikiText articles: a top-level heading line `` = Title = `` (not `` = = Section = = ``)
    and every line up to the next one, joined as in the file (each line ends in a newline);
    blank lines at either end of an article are dropped. Non-blank text before the first
    heading is a record of its own; a text without headings is one record."""
    articles: list[list[str]] = [[]]
    for line in lines:
        if _TOP_HEADING.match(line.rstrip("\n")):
            articles.append([])
        articles[-1].append(line if line.endswith("\n") else line + "\n")
    out = []
    for art in articles:
        while art and not art[0].strip():
            art.pop(0)
        while art and not art[-1].strip():
            art.pop()
        if art:
            out.append("".join(art))
    return out


def corpus_records(corpus: Corpus, unit: str) -> list[str]:
    """The records of ``corpus``: for a text file, WikiText articles (``unit="records"``,
    :func:`split_articles`; the analogue of the papers' Wikipedia records) or its non-blank
    lines (``unit="lines"``: the rows of Hugging Face's wikitext, which the original reads with
    ``mom2_dataset: wikitext``); for an ``hf:`` dataset, its non-empty rows either way (all
    read into memory to count and select them: meant for datasets that fit)."""
    if corpus.path is not None:
        with open(corpus.path, encoding="utf-8-sig") as f:
            lines = f.readlines()
        if unit == "lines":
            return [line if line.endswith("\n") else line + "\n"
                    for line in lines if line.strip()]
        if not any(_TOP_HEADING.match(line.rstrip("\n")) for line in lines):
            warnings.warn(f"statistics corpus {corpus.name} has no ' = Title = ' headings: it "
                          f"is one record (use stats_sampling=lines for one record per line)",
                          stacklevel=3)
        return split_articles(lines)
    return [text for text in corpus.rows() if text.strip()]


def select_records(n_available: int, n_records: int) -> list[int]:
    """Indices of the records used: all of them (in order) when ``n_records >= n_available``,
    else the original's fixed pseudo-random subset: ``random.Random(1).shuffle`` of
    ``range(n_available)``, first ``n_records`` (ROME's ``FixedRandomSubsetSampler``), sorted."""
    if n_records < 1:
        raise UserError(f"stats_records must be at least 1 (got {n_records})")
    idx = list(range(n_available))
    if n_records >= n_available:
        return idx
    random.Random(RECORD_SUBSET_SEED).shuffle(idx)
    return sorted(idx[:n_records])


def context_length(config: Any) -> int:
    """The original's truncation length of a record: the model's context (``n_positions``,
    ``max_sequence_length``, ``max_position_embeddings`` or ``seq_length``, first found), but
    4096 for Mistral without a sliding window (its window when it has one) and for Qwen2."""
    for name in ("n_positions", "max_sequence_length", "max_position_embeddings", "seq_length"):
        value = getattr(config, name, None)
        if value:
            n = int(value)
            break
    else:
        raise UserError(f"model config ({type(config).__name__}) names no context length")
    model_type = str(getattr(config, "model_type", ""))
    if "mistral" in model_type:
        n = int(getattr(config, "sliding_window", None) or 4096)
    if "qwen2" in model_type:
        n = 4096
    return n


@dataclass
class TokenRecords:
    """Selected records as token sequences (``records mode``).

    ``records``: 1-D int64 tensors, each one record tokenised as the model's tokenizer does by
    default (special tokens included, e.g. a BOS) and truncated to ``max_len`` tokens; every
    position is a sample. ``n_available``: records in the corpus; ``indices``: those used.
    """

    records: list[Tensor]
    max_len: int
    n_available: int
    indices: list[int]
    unit: str

    @property
    def n_records(self) -> int:
        return len(self.records)

    @property
    def n_tokens(self) -> int:
        return sum(r.numel() for r in self.records)

    def batches(self, batch_tokens: int) -> Iterator[tuple[Tensor, Tensor]]:
        """``(ids (b, T), keep (b, T) bool)``: records sorted by length (longest first), right
        padded with 0 to the longest in the batch, ``b * T <= batch_tokens`` (or one record).
        ``keep`` marks the real positions."""
        if batch_tokens < 1:
            raise UserError(f"batch_tokens must be at least 1 (got {batch_tokens})")
        order = sorted(range(len(self.records)), key=lambda i: -self.records[i].numel())
        i = 0
        while i < len(order):
            width = self.records[order[i]].numel()
            j = i + 1
            while j < len(order) and (j - i + 1) * width <= batch_tokens:
                j += 1
            rows = [self.records[k] for k in order[i:j]]
            ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)
            lengths = torch.tensor([r.numel() for r in rows])
            keep = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
            yield ids, keep
            i = j


def tokenize_records(tokenizer: Any, corpus: Corpus, n_records: int, max_len: int,
                     unit: str = "records") -> TokenRecords:
    """Records of ``corpus`` (:func:`corpus_records`), the subset :func:`select_records`,
    each tokenised on its own with the tokenizer's default special tokens and truncated to
    ``max_len`` (as ``tokenizer.encode(text, truncation=True, max_length=max_len)``). Fewer
    records than ``n_records`` give a warning and all are used."""
    texts = corpus_records(corpus, unit)
    if not texts:
        raise UserError(f"statistics corpus {corpus.name} holds no text")
    if n_records > len(texts):
        warnings.warn(f"statistics corpus {corpus.name} has only {len(texts)} {unit} "
                      f"(< stats_records={n_records}); using all of them", stacklevel=2)
    idx = select_records(len(texts), n_records)
    enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_len,
                    verbose=False)["input_ids"]
    records = [torch.tensor(ids, dtype=torch.long) for ids in enc if ids]
    if len(records) != len(idx):  # pragma: no cover - a non-blank text has tokens
        raise UserError(f"statistics corpus {corpus.name}: a record tokenised to nothing")
    return TokenRecords(records=records, max_len=max_len, n_available=len(texts),
                        indices=idx, unit=unit)


def count_records(corpus: Corpus, unit: str) -> int:
    """Number of records of ``corpus`` (:func:`corpus_records`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return len(corpus_records(corpus, unit))


def record_chunks(lm: LoadedModel, corpus: str | Path | None = None, n_records: int = 100_000,
                  unit: str = "records") -> TokenRecords:
    """:func:`tokenize_records` for ``lm`` (truncation at :func:`context_length`)."""
    return tokenize_records(lm.tokenizer, resolve_corpus(corpus), n_records,
                            context_length(lm.model.config), unit)
