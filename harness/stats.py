"""Second moments of the keys of rewrite layers over a text corpus, streamed and cached on disk.

For layer ``l`` with rewrite matrix ``W`` (``(d_out, d_in)``, the MLP output projection named by
``lm.spec.rewrite(l)``), the key of a token position is the input ``k`` (``(d_in,)``) of that
module. Over ``N`` corpus tokens with keys stacked as rows of ``K`` (``(N, d_in)``)::

    C0 = E[k k^T] = K^T K / N                                   (d_in, d_in), float32

the uncentred second moment that ROME/MEMIT/AlphaEdit use as the "preserved knowledge" term.

Sampling scheme (part of the cache identity through :data:`STATS_VERSION`): the corpus is read
line by line (a text file, or the text column of a Hugging Face dataset), each line tokenised
without special tokens, the ids concatenated and cut after ``n_tokens``. The stream is cut into
consecutive chunks of ``seq_len`` positions; if the tokenizer adds a BOS token to its inputs,
every chunk starts with BOS and holds ``seq_len - 1`` corpus tokens, and the BOS position is
context only (not a sample). Every corpus token is exactly one sample; there is no padding. The
last chunk may be shorter and runs in its own batch.

One forward pass serves all requested layers: a pre-hook on each rewrite module accumulates
``K^T K`` on the device in ``accum_dtype``, and the pass stops (:class:`~harness.nethook.
StopForward`) right after the deepest requested rewrite module, so later layers and the LM head
cost nothing.

Cache: ``cache_dir()/stats/<key>.safetensors``, one file per layer (tensor ``C0`` plus string
metadata), ``key = sha256`` of the JSON of (stats version, model sha256, layer, rewrite module
name, corpus sha256, n_tokens, seq_len, model dtype, accumulation dtype). A call computes only
the layers that are not cached yet, in one pass. Files are written atomically (temporary file +
``os.replace``) and read with ``safetensors`` (no pickle). Statistics describe the model that
``lm.sha256`` identifies: compute them before editing the weights.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from harness.errors import UserError
from harness.models import LoadedModel, cache_dir, sha256_file
from harness.nethook import on_inputs, stop_after

STATS_VERSION = "1"
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
        assert self.hf is not None
        ds = _load_hf(*self.hf)
        column: str | None = None
        for rec in ds:
            if column is None:
                column = _text_column(rec, self.name)
            text = rec[column]
            if text:
                yield text if text.endswith("\n") else text + "\n"


def default_corpus_path() -> Path:
    """``$KEH_DATA_DIR/wikitext-2/valid.txt`` (data dir as for the suites: else ``./data``)."""
    from suites.data import data_dir

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
                f"default statistics corpus {path} not found (it is "
                f"$KEH_DATA_DIR/{DEFAULT_CORPUS.as_posix()}; KEH_DATA_DIR="
                f"{os.environ.get('KEH_DATA_DIR', '<unset>')}); set KEH_DATA_DIR or pass a "
                f"text file or 'hf:<name>[:config][:split]' as the corpus"
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
# Accumulation
# ---------------------------------------------------------------------------------------------


def accumulate_second_moments(
    lm: LoadedModel,
    layers: Sequence[int],
    tokens: TokenChunks,
    batch_size: int = 16,
    accum_dtype: torch.dtype = torch.float32,
    early_stop: bool = True,
    show_progress: bool = True,
) -> dict[int, Tensor]:
    """``C0[l] = K_l^T K_l / N`` for each layer in one streamed pass over ``tokens``.

    ``K_l`` (``(N, d_in)``) stacks the inputs of ``lm.spec.rewrite(l)`` at every corpus position
    (context prefix positions excluded). Per batch ``X`` (``(b, T, d_in)``) the pre-hook does
    ``S_l += K_b^T K_b`` with ``K_b = X[:, n_prefix:].reshape(-1, d_in)`` cast to ``accum_dtype``
    (``S_l`` lives on ``lm.device``), updating only the block upper triangle
    (:func:`_sym_rank_update`). With ``early_stop`` the pass ends after the deepest rewrite
    module. Returns ``{l: sym(S_l) / N}``, each ``(d_in, d_in)`` in ``accum_dtype``, exactly
    symmetric.
    """
    if not layers:
        return {}
    layers = sorted(set(layers))
    for layer in layers:
        if not 0 <= layer < lm.n_layers:
            raise UserError(f"layer {layer} out of range for a {lm.n_layers}-layer model")
    device = lm.device
    sums: dict[int, Tensor] = {}
    callbacks = {}
    p = tokens.n_prefix
    for layer in layers:
        d_in = lm.rewrite_weight(layer).shape[1]
        sums[layer] = torch.zeros(d_in, d_in, dtype=accum_dtype, device=device)

        def acc(x: Tensor, _s: Tensor = sums[layer], _d: int = d_in) -> None:
            if p and x.ndim != 3:
                raise RuntimeError(f"expected (batch, seq, d_in) keys to drop the prefix "
                                   f"position, got shape {tuple(x.shape)}")
            k = (x[:, p:] if p else x).reshape(-1, _d)
            with _lossless_tf32(k.dtype, accum_dtype, k.device):
                _sym_rank_update(_s, k.to(accum_dtype))

        callbacks[lm.spec.rewrite(layer)] = acc
    deepest = lm.spec.rewrite(layers[-1])
    from tqdm.auto import tqdm

    bar = tqdm(total=tokens.n_tokens, unit="tok", unit_scale=True, disable=not show_progress,
               desc=f"C0 layers {','.join(map(str, layers))}")
    count = 0
    with torch.inference_mode(), on_inputs(lm.model, callbacks):
        for batch in tokens.batches(batch_size):
            ids = batch.to(device)
            if early_stop:
                with stop_after(lm.model, deepest):
                    lm.model(input_ids=ids, use_cache=False)
            else:
                lm.model(input_ids=ids, use_cache=False)
            n = ids.shape[0] * (ids.shape[1] - p)
            count += n
            bar.update(n)
    bar.close()
    if count != tokens.n_tokens:  # pragma: no cover - guards the chunking invariant
        raise RuntimeError(f"counted {count} samples, expected {tokens.n_tokens}")
    return {layer: _symmetric_from_upper(s).div_(count) for layer, s in sums.items()}


@contextmanager
def _lossless_tf32(src: torch.dtype, accum: torch.dtype, device: torch.device
                   ) -> Iterator[None]:
    """Let float32 GEMMs use TF32 tensor cores where that loses nothing: keys of a 16-bit
    model (bf16: 8-bit exponent, 7-bit mantissa; fp16: 5/10) are exactly representable in
    TF32 (8/10), and tensor cores accumulate in float32, so ``S += k^T k`` matches the float32
    product to accumulation rounding (measured on an H100, random bf16 GPT-J-6B, layers 3-8,
    20k tokens: relative Frobenius difference 1e-5) at several times the speed (there the
    16384-wide keys made full float32 GEMMs the bottleneck: statistics went from 0.62 to 1.63
    times the forward-pass throughput). Float32 models keep full float32 products."""
    if not (device.type == "cuda" and accum == torch.float32
            and src in (torch.bfloat16, torch.float16)):
        yield
        return
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _row_blocks(d: int) -> int:
    """Number of row blocks for :func:`_sym_rank_update` (4 from d = 1024 up, 2 from 256)."""
    return 4 if d >= 1024 else 2 if d >= 256 else 1


def _sym_rank_update(S: Tensor, k: Tensor) -> None:
    """``S += k^T k`` on the block upper triangle only, in place.

    ``S`` ``(d, d)``, ``k`` ``(n, d)``. With ``B`` row blocks of width ``w`` the update of row
    block ``i`` is one GEMM ``S[i, i:] += k[:, i]^T k[:, i:]`` (``(w, n) @ (n, d - i w)``), so
    ``(B + 1) / (2 B)`` of the full product's work (5/8 for ``B = 4``); blocks below the
    diagonal are left untouched and :func:`_symmetric_from_upper` restores them.
    """
    d = S.shape[0]
    nb = _row_blocks(d)
    if nb == 1:
        S.addmm_(k.mT, k)
        return
    edges = [d * i // nb for i in range(nb + 1)]
    for a, b in itertools.pairwise(edges):
        S[a:b, a:].addmm_(k[:, a:b].mT, k[:, a:])


def _symmetric_from_upper(S: Tensor) -> Tensor:
    """``triu(S) + triu(S, 1)^T``: the symmetric matrix whose upper triangle ``S`` holds."""
    return torch.triu(S) + torch.triu(S, 1).mT


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def stats_key(lm: LoadedModel, layer: int, corpus_sha256: str, n_tokens: int, seq_len: int,
              accum_dtype: torch.dtype = torch.float32) -> str:
    """SHA-256 hex of the JSON of everything that determines ``C0`` of ``layer``."""
    payload = {
        "version": STATS_VERSION,
        "model_sha256": lm.sha256,
        "layer": int(layer),
        "module": lm.spec.rewrite(layer),
        "corpus_sha256": corpus_sha256,
        "n_tokens": int(n_tokens),
        "seq_len": int(seq_len),
        "dtype": str(lm.dtype),
        "accum_dtype": str(accum_dtype),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def stats_dir() -> Path:
    return cache_dir() / "stats"


def _save_atomic(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp,
                  metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path, name: str, device: torch.device) -> tuple[Tensor, dict[str, str]] | None:
    """Tensor ``name`` and the metadata of a cache file, or None if absent or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensor = f.get_tensor(name)
    except Exception as exc:  # a truncated/corrupt file: recompute and overwrite
        warnings.warn(f"ignoring unreadable cache file {path}: {exc}", stacklevel=3)
        return None
    return tensor.to(device), meta


@dataclass
class StatsResult:
    """``C0`` per layer plus, per layer, the cache key, file and metadata (for the manifest).

    ``meta[l]`` holds strings: ``key``, ``model_sha256``, ``layer``, ``module``, ``corpus``,
    ``corpus_sha256``, ``n_tokens`` (samples actually used), ``n_tokens_requested``,
    ``seq_len``, ``dtype``, ``accum_dtype``, ``version``, ``compute_s``, ``created``.
    """

    C0: dict[int, Tensor]
    meta: dict[int, dict[str, str]]
    paths: dict[int, Path]
    computed: list[int] = field(default_factory=list)

    @property
    def keys(self) -> dict[int, str]:
        return {layer: m["key"] for layer, m in self.meta.items()}

    def provenance(self) -> dict[str, Any]:
        """JSON-able summary: per layer key, tokens, corpus hash, file, cached or computed."""
        return {
            str(layer): {
                "key": m["key"],
                "n_tokens": int(m["n_tokens"]),
                "corpus": m.get("corpus", ""),
                "corpus_sha256": m["corpus_sha256"],
                "seq_len": int(m["seq_len"]),
                "file": str(self.paths[layer]),
                "cached": layer not in self.computed,
            }
            for layer, m in sorted(self.meta.items())
        }


def second_moment_stats(
    lm: LoadedModel,
    layers: Sequence[int],
    corpus: str | Path | None = None,
    n_tokens: int = 100_000,
    seq_len: int = 256,
    batch_size: int = 16,
    accum_dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
) -> StatsResult:
    """Cached ``C0 = E[k k^T]`` (``(d_in, d_in)``, ``accum_dtype``, on ``lm.device``) per layer.

    Cached layers are read from disk; the missing ones are computed together in one pass
    (:func:`accumulate_second_moments`) and written, one file per layer.
    """
    layers = sorted({int(layer) for layer in layers})
    src = resolve_corpus(corpus)
    keys = {layer: stats_key(lm, layer, src.sha256, n_tokens, seq_len, accum_dtype)
            for layer in layers}
    paths = {layer: stats_dir() / f"{keys[layer]}.safetensors" for layer in layers}
    C0: dict[int, Tensor] = {}
    meta: dict[int, dict[str, str]] = {}
    for layer in layers:
        got = _load(paths[layer], "C0", lm.device)
        if got is not None:
            C0[layer], meta[layer] = got
    missing = [layer for layer in layers if layer not in C0]
    if missing:
        t0 = time.perf_counter()
        tokens = tokenize_corpus(lm.tokenizer, src, n_tokens, seq_len)
        fresh = accumulate_second_moments(lm, missing, tokens, batch_size=batch_size,
                                          accum_dtype=accum_dtype, show_progress=show_progress)
        elapsed = time.perf_counter() - t0
        for layer in missing:
            m = {
                "key": keys[layer], "model_sha256": lm.sha256, "layer": str(layer),
                "module": lm.spec.rewrite(layer), "corpus": src.name,
                "corpus_sha256": src.sha256, "n_tokens": str(tokens.n_tokens),
                "n_tokens_requested": str(n_tokens), "n_prefix": str(tokens.n_prefix),
                "seq_len": str(seq_len), "dtype": str(lm.dtype), "accum_dtype": str(accum_dtype),
                "version": STATS_VERSION, "compute_s": f"{elapsed:.3f}",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            _save_atomic(paths[layer], {"C0": fresh[layer]}, m)
            C0[layer], meta[layer] = fresh[layer], m
    return StatsResult(C0=C0, meta=meta, paths=paths, computed=missing)


def second_moments(
    lm: LoadedModel,
    layers: list[int],
    corpus: str | Path | None = None,
    n_tokens: int = 100_000,
    seq_len: int = 256,
    batch_size: int = 16,
    accum_dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
) -> dict[int, Tensor]:
    """``{layer: C0}`` with ``C0 = E[k k^T]`` ``(d_in, d_in)``; see :func:`second_moment_stats`
    (which also returns the cache keys and provenance metadata)."""
    return second_moment_stats(lm, layers, corpus, n_tokens, seq_len, batch_size, accum_dtype,
                               show_progress).C0


def stats_provenance(lm: LoadedModel, layers: Sequence[int], corpus: str | Path | None = None,
                     n_tokens: int = 100_000, seq_len: int = 256,
                     accum_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Provenance of already cached statistics (key, file, and stored metadata per layer),
    without computing anything; layers not cached map to ``{"key": ..., "cached": False}``."""
    from safetensors import safe_open

    src = resolve_corpus(corpus)
    out: dict[str, Any] = {}
    for layer in sorted({int(x) for x in layers}):
        key = stats_key(lm, layer, src.sha256, n_tokens, seq_len, accum_dtype)
        path = stats_dir() / f"{key}.safetensors"
        entry: dict[str, Any] = {"key": key, "file": str(path), "cached": path.is_file()}
        if path.is_file():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                entry.update(f.metadata() or {})
        out[str(layer)] = entry
    return out


def cached_projector(lm: LoadedModel, layer: int, C0: Tensor, key: str,
                     threshold: float) -> Tensor:
    """AlphaEdit's null-space projector ``P = U0 U0^T`` (``(d_in, d_in)``, float32, on
    ``lm.device``) of ``C0``, cached on disk by (stats ``key``, ``threshold``).

    ``U0`` are the eigenvectors of ``C0`` with eigenvalue below ``threshold``
    (:func:`methods.solvers.nullspace_projector`). ``key`` must be the stats key of ``C0``
    (``StatsResult.keys[layer]``); the eigendecomposition of a large ``C0`` (e.g. 14336^2) is
    the expensive part this cache saves.
    """
    from methods.solvers import nullspace_projector

    pkey = hashlib.sha256(json.dumps({"stats_key": key, "threshold": float(threshold),
                                      "kind": "nullspace"}, sort_keys=True).encode()).hexdigest()
    path = stats_dir() / f"projector-{pkey}.safetensors"
    d_in = C0.shape[-1]
    got = _load(path, "P", lm.device)
    if got is not None and tuple(got[0].shape) == (d_in, d_in):
        return got[0]
    P = nullspace_projector(C0, threshold).to(torch.float32)
    _save_atomic(path, {"P": P}, {
        "stats_key": key, "threshold": repr(float(threshold)), "layer": str(layer),
        "model_sha256": lm.sha256, "module": lm.spec.rewrite(layer),
        "rank": str(round(float(torch.trace(P)))),
    })
    return P.to(lm.device)


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------


def benchmark_stats(lm: LoadedModel, layers: Sequence[int], n_tokens: int = 100_000,
                    corpus: str | Path | None = None, seq_len: int = 256, batch_size: int = 16,
                    baseline_tokens: int | None = None, repeats: int = 1) -> dict[str, Any]:
    """Throughput of the one-pass statistics vs a plain forward pass over the same tokens.

    All passes run under ``torch.inference_mode`` on the same :class:`TokenChunks` and batches,
    after one warm-up batch each; nothing is read from or written to the cache. Timed, in turn
    for each of ``repeats`` rounds: ``forward`` (the full model with logits), ``forward_no_head``
    (stopped after the final norm, i.e. without the LM head) and ``stats``
    (:func:`accumulate_second_moments` for ``layers`` over all ``n_tokens``). The forward
    baselines cover the first ``baseline_tokens`` tokens (all by default; a prefix keeps the
    benchmark short on slow CPUs, since tokens/s is a steady rate). Each ``*_tok_s`` is tokens
    over the fastest round (least disturbed by other load); ``*_s_all`` lists every round and
    ``*_cpu_s`` is the process CPU time of the fastest round (on a shared CPU, ``cpu_s /
    threads`` approximates the wall time of an otherwise idle machine).
    ``ratio = stats_tok_s / forward_tok_s`` (the target is >= 0.7).
    """
    layers = sorted(set(layers))
    t0 = time.perf_counter()
    tokens = corpus_chunks(lm, corpus, n_tokens, seq_len)
    tokenize_s = time.perf_counter() - t0
    device = lm.device

    def prefix(n: int) -> TokenChunks:
        chunks, total = [], 0
        for c in tokens.chunks:
            if total >= n:
                break
            chunks.append(c)
            total += c.numel() - tokens.n_prefix
        return TokenChunks(chunks, tokens.n_prefix, total, seq_len)

    base = prefix(baseline_tokens) if baseline_tokens else tokens

    def timed(fn: Any) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t, c = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t, time.process_time() - c

    def forward(chunks: TokenChunks, stop: str | None) -> None:
        with torch.inference_mode():
            for batch in chunks.batches(batch_size):
                ids = batch.to(device)
                if stop is None:
                    lm.model(input_ids=ids, use_cache=False)
                else:
                    with stop_after(lm.model, stop):
                        lm.model(input_ids=ids, use_cache=False)

    def run_stats(chunks: TokenChunks) -> None:
        accumulate_second_moments(lm, layers, chunks, batch_size, show_progress=False)

    warm = prefix(min(tokens.n_tokens, batch_size * (seq_len - tokens.n_prefix)))
    forward(warm, None)
    run_stats(warm)
    times: dict[str, list[tuple[float, float]]] = {"forward": [], "forward_no_head": [],
                                                   "stats": []}
    for _ in range(max(1, repeats)):
        times["forward"].append(timed(lambda: forward(base, None)))
        times["forward_no_head"].append(timed(lambda: forward(base, lm.spec.final_norm)))
        times["stats"].append(timed(lambda: run_stats(tokens)))
    out: dict[str, Any] = {
        "model": lm.name, "device": str(device), "dtype": str(lm.dtype),
        "threads": torch.get_num_threads(), "layers": layers, "n_tokens": tokens.n_tokens,
        "baseline_tokens": base.n_tokens, "seq_len": seq_len, "batch_size": batch_size,
        "repeats": max(1, repeats), "tokenize_s": tokenize_s,
    }
    for name, ts in times.items():
        n = tokens.n_tokens if name == "stats" else base.n_tokens
        wall, cpu = min(ts)
        out[f"{name}_s"] = wall
        out[f"{name}_s_all"] = [w for w, _ in ts]
        out[f"{name}_tok_s"] = n / wall
        out[f"{name}_cpu_s"] = cpu
    out["ratio"] = out["stats_tok_s"] / out["forward_tok_s"]
    out["ratio_no_head"] = out["stats_tok_s"] / out["forward_no_head_tok_s"]
    out["stats_total_s_est"] = tokenize_s + out["stats_s"]
    return out
