"""Second moments of the keys of rewrite layers over a text corpus, streamed and cached on disk.

For layer ``l`` with rewrite matrix ``W`` (``(d_out, d_in)``, the MLP output projection named by
``lm.spec.rewrite(l)``), the key of a token position is the input ``k`` (``(d_in,)``) of that
module. Over ``N`` corpus tokens with keys stacked as rows of ``K`` (``(N, d_in)``)::

    C0 = E[k k^T] = K^T K / N                                   (d_in, d_in), float32

the uncentred second moment that ROME/MEMIT/AlphaEdit use as the "preserved knowledge" term.

Sampling (``sampling``, part of the cache identity) is :mod:`harness.corpus`'s: whole
records (the original's) or fixed-length token chunks (this harness's earlier scheme).

One forward pass serves all requested layers: a pre-hook on each rewrite module accumulates
``K^T K`` on the device in ``accum_dtype``, and the pass stops (:class:`~harness.nethook.
StopForward`) right after the deepest requested rewrite module, so later layers and the LM head
cost nothing.

Cache: ``cache_dir()/stats/<key>.safetensors``, one file per layer (tensor ``C0`` plus string
metadata), ``key = sha256`` of the JSON of (stats version, model sha256, layer, rewrite module
name, corpus sha256, n_tokens, seq_len, model dtype, accumulation dtype) in tokens mode
(:func:`stats_key`, unchanged since version 1), and of (records version, sampling, selection
rule, records used, truncation length, model sha256, layer, module, corpus sha256, dtypes) in
records modes (:func:`records_key`). A call computes only
the layers that are not cached yet, in one pass. Files are written atomically (temporary file +
``os.replace``) and read with ``safetensors`` (no pickle). Statistics describe the model that
``lm.sha256`` identifies: compute them before editing the weights.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from harness.cachefiles import atomic_write_with, key_lock, tensors_sha256
from harness.corpus import (
    RECORD_SUBSET_SEED,
    SAMPLING_MODES,
    Corpus,
    TokenChunks,
    TokenRecords,
    check_sampling,
    context_length,
    corpus_chunks,
    corpus_records,
    count_records,
    resolve_corpus,
    select_records,
    tokenize_corpus,
    tokenize_records,
)
from harness.errors import UserError
from harness.models import LoadedModel, cache_dir
from harness.nethook import on_inputs, stop_after

STATS_VERSION = "1"
RECORDS_VERSION = "records-1"


# ---------------------------------------------------------------------------------------------
# Accumulation
# ---------------------------------------------------------------------------------------------


def accumulate_second_moments(
    lm: LoadedModel,
    layers: Sequence[int],
    tokens: TokenChunks | TokenRecords,
    batch_size: int = 16,
    accum_dtype: torch.dtype = torch.float32,
    early_stop: bool = True,
    show_progress: bool = True,
    batch_tokens: int = 4096,
) -> dict[int, Tensor]:
    """``C0[l] = K_l^T K_l / N`` for each layer in one streamed pass over ``tokens``.

    ``K_l`` (``(N, d_in)``) stacks the inputs of ``lm.spec.rewrite(l)`` at every sample
    position: every corpus position of :class:`TokenChunks` (context prefix excluded; batches
    of ``batch_size`` chunks), or every real position of every record of
    :class:`TokenRecords` (padding excluded; length-sorted, right-padded batches of at most
    ``batch_tokens`` padded positions; with causal attention and right padding the real
    positions see exactly what they see alone, so no attention mask is needed). Per batch ``X``
    (``(b, T, d_in)``) the pre-hook does ``S_l += K_b^T K_b`` with ``K_b`` the sample rows of
    ``X`` (``X[:, n_prefix:]`` or ``X[keep]``) cast to ``accum_dtype`` (``S_l`` lives on
    ``lm.device``), updating only the block upper triangle (:func:`_sym_rank_update`). With
    ``early_stop`` the pass ends after the deepest rewrite module. Returns
    ``{l: sym(S_l) / N}``, each ``(d_in, d_in)`` in ``accum_dtype``, exactly symmetric.
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
    p = tokens.n_prefix if isinstance(tokens, TokenChunks) else 0
    current: dict[str, Tensor | None] = {"keep": None}
    for layer in layers:
        d_in = lm.rewrite_weight(layer).shape[1]
        sums[layer] = torch.zeros(d_in, d_in, dtype=accum_dtype, device=device)

        def acc(x: Tensor, _s: Tensor = sums[layer], _d: int = d_in) -> None:
            keep = current["keep"]
            if (p or keep is not None) and x.ndim != 3:
                raise RuntimeError(f"expected (batch, seq, d_in) keys to select the sample "
                                   f"positions, got shape {tuple(x.shape)}")
            if keep is not None:
                k = x[keep]
            else:
                k = (x[:, p:] if p else x).reshape(-1, _d)
            with _lossless_tf32(k.dtype, accum_dtype, k.device):
                _sym_rank_update(_s, k.to(accum_dtype))

        callbacks[lm.spec.rewrite(layer)] = acc
    deepest = lm.spec.rewrite(layers[-1])
    from tqdm.auto import tqdm

    bar = tqdm(total=tokens.n_tokens, unit="tok", unit_scale=True, disable=not show_progress,
               desc=f"C0 layers {','.join(map(str, layers))}")
    if isinstance(tokens, TokenRecords):
        batches: Iterable[tuple[Tensor, Tensor | None]] = tokens.batches(batch_tokens)
    else:
        batches = ((b, None) for b in tokens.batches(batch_size))
    count = 0
    with torch.inference_mode(), on_inputs(lm.model, callbacks):
        for batch, keep in batches:
            ids = batch.to(device)
            current["keep"] = keep.to(device) if keep is not None else None
            if early_stop:
                with stop_after(lm.model, deepest):
                    lm.model(input_ids=ids, use_cache=False)
            else:
                lm.model(input_ids=ids, use_cache=False)
            n = int(keep.sum()) if keep is not None else ids.shape[0] * (ids.shape[1] - p)
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


def records_key(lm: LoadedModel, layer: int, corpus_sha256: str, sampling: str,
                n_records: int, max_len: int, accum_dtype: torch.dtype = torch.float32) -> str:
    """Cache key of records-mode ``C0`` (``sampling`` "records" or "lines"): SHA-256 hex of the
    JSON of (records stats version, sampling, record selection rule, number of records actually
    used, truncation length, model sha256, layer, module, corpus sha256, dtypes). Its payload
    differs from :func:`stats_key`'s, so the two modes never share a key."""
    payload = {
        "version": RECORDS_VERSION,
        "sampling": check_sampling(sampling),
        "selection": f"random.Random({RECORD_SUBSET_SEED}) subset",
        "n_records": int(n_records),
        "max_len": int(max_len),
        "model_sha256": lm.sha256,
        "layer": int(layer),
        "module": lm.spec.rewrite(layer),
        "corpus_sha256": corpus_sha256,
        "dtype": str(lm.dtype),
        "accum_dtype": str(accum_dtype),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def stats_dir() -> Path:
    return cache_dir() / "stats"


def _save_atomic(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a cache file all or nothing (temp file, fsync, rename, fsync of the directory),
    with the content hash of its tensors in the metadata (``content_sha256``)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {**metadata, "content_sha256": tensors_sha256(cpu)}
    atomic_write_with(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def _load(path: Path, name: str, device: torch.device) -> tuple[Tensor, dict[str, str]] | None:
    """Tensor ``name`` and the metadata of a cache file, or None if absent, unreadable or
    damaged (its tensors do not hash to the stored ``content_sha256``, or it has none): a
    warning, then the caller recomputes and overwrites it."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensor = tensors[name]
    except Exception as exc:  # a truncated/corrupt file: recompute and overwrite
        warnings.warn(f"ignoring unreadable cache file {path}: {exc}", stacklevel=3)
        return None
    stored = meta.pop("content_sha256", None)
    if stored != tensors_sha256(tensors):
        why = "has no content hash" if stored is None else "does not match its content hash"
        warnings.warn(f"ignoring cache file {path}: it {why} (modified or damaged); "
                      f"recomputing it", stacklevel=3)
        return None
    return tensor.to(device), meta


@dataclass
class StatsResult:
    """``C0`` per layer plus, per layer, the cache key, file and metadata (for the manifest).

    ``meta[l]`` holds strings: ``key``, ``model_sha256``, ``layer``, ``module``, ``corpus``,
    ``corpus_sha256``, ``sampling``, ``n_tokens`` (samples actually used), ``seq_len`` (the
    truncation length in records modes), ``dtype``, ``accum_dtype``, ``version``,
    ``compute_s``, ``created``; tokens mode adds ``n_tokens_requested`` and ``n_prefix``,
    records modes ``n_records`` (used), ``n_records_requested``, ``n_records_available``,
    ``max_len`` and ``selection``.
    """

    C0: dict[int, Tensor]
    meta: dict[int, dict[str, str]]
    paths: dict[int, Path]
    computed: list[int] = field(default_factory=list)

    @property
    def keys(self) -> dict[int, str]:
        return {layer: m["key"] for layer, m in self.meta.items()}

    def provenance(self) -> dict[str, Any]:
        """JSON-able summary: per layer key, sampling mode, tokens (and, in records modes,
        records used / requested / available), corpus hash, file, cached or computed."""
        out: dict[str, Any] = {}
        for layer, m in sorted(self.meta.items()):
            entry: dict[str, Any] = {
                "key": m["key"],
                "sampling": m.get("sampling", "tokens"),
                "n_tokens": int(m["n_tokens"]),
                "corpus": m.get("corpus", ""),
                "corpus_sha256": m["corpus_sha256"],
                "seq_len": int(m["seq_len"]),
                "file": str(self.paths[layer]),
                "cached": layer not in self.computed,
            }
            for k in ("n_records", "n_records_requested", "n_records_available", "max_len"):
                if k in m:
                    entry[k] = int(m[k])
            out[str(layer)] = entry
        return out


@dataclass(frozen=True)
class Sampling:
    """What a statistics call samples: ``mode`` (:data:`SAMPLING_MODES`); for "tokens"
    ``n_tokens`` corpus tokens in chunks of ``seq_len``; for "records"/"lines" ``n_records``
    records (requested), each truncated to the model's context length."""

    mode: str = "tokens"
    n_tokens: int = 100_000
    seq_len: int = 256
    n_records: int = 100_000


def _plan_keys(lm: LoadedModel, layers: Sequence[int], src: Corpus, how: Sampling,
               accum_dtype: torch.dtype) -> tuple[dict[int, str], dict[str, int]]:
    """Cache key per layer and, for records modes, the record counts (requested, available,
    used) and the truncation length."""
    check_sampling(how.mode)
    if how.mode == "tokens":
        return ({layer: stats_key(lm, layer, src.sha256, how.n_tokens, how.seq_len, accum_dtype)
                 for layer in layers}, {})
    if how.n_records < 1:
        raise UserError(f"stats_records must be at least 1 (got {how.n_records})")
    available = count_records(src, how.mode)
    if available == 0:
        raise UserError(f"statistics corpus {src.name} holds no text")
    info = {"n_records_requested": how.n_records, "n_records_available": available,
            "n_records": min(how.n_records, available),
            "max_len": context_length(lm.model.config)}
    return ({layer: records_key(lm, layer, src.sha256, how.mode, info["n_records"],
                                info["max_len"], accum_dtype) for layer in layers}, info)


def second_moment_stats(
    lm: LoadedModel,
    layers: Sequence[int],
    corpus: str | Path | None = None,
    n_tokens: int = 100_000,
    seq_len: int = 256,
    batch_size: int = 16,
    accum_dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
    *,
    sampling: str = "tokens",
    n_records: int = 100_000,
    batch_tokens: int = 4096,
) -> StatsResult:
    """Cached ``C0 = E[k k^T]`` (``(d_in, d_in)``, ``accum_dtype``, on ``lm.device``) per layer.

    ``sampling="tokens"``: the first ``n_tokens`` corpus tokens in chunks of ``seq_len``
    (:func:`tokenize_corpus`). ``"records"`` / ``"lines"``: ``n_records`` records (articles /
    lines; :func:`tokenize_records`), the original's sampling. Cached layers are read from
    disk; the missing ones are computed together in one pass
    (:func:`accumulate_second_moments`) and written, one file per layer.
    """
    how = Sampling(sampling, n_tokens, seq_len, n_records)
    layers = sorted({int(layer) for layer in layers})
    src = resolve_corpus(corpus)
    keys, info = _plan_keys(lm, layers, src, how, accum_dtype)
    paths = {layer: stats_dir() / f"{keys[layer]}.safetensors" for layer in layers}
    # one process computes a key at a time; another needing it waits, then reads the file
    with key_lock(cache_dir() / "locks", keys.values()):
        C0: dict[int, Tensor] = {}
        meta: dict[int, dict[str, str]] = {}
        for layer in layers:
            got = _load(paths[layer], "C0", lm.device)
            if got is not None:
                C0[layer], meta[layer] = got
        missing = [layer for layer in layers if layer not in C0]
        if missing:
            t0 = time.perf_counter()
            tokens: TokenChunks | TokenRecords
            if how.mode == "tokens":
                tokens = tokenize_corpus(lm.tokenizer, src, n_tokens, seq_len)
                mode_meta = {"n_tokens_requested": str(n_tokens), "n_prefix": str(tokens.n_prefix),
                             "seq_len": str(seq_len)}
            else:
                tokens = tokenize_records(lm.tokenizer, src, n_records, info["max_len"], how.mode)
                mode_meta = {"seq_len": str(info["max_len"]),
                             **{k: str(v) for k, v in info.items()},
                             "selection": f"random.Random({RECORD_SUBSET_SEED}) subset"}
            fresh = accumulate_second_moments(lm, missing, tokens, batch_size=batch_size,
                                              accum_dtype=accum_dtype, show_progress=show_progress,
                                              batch_tokens=batch_tokens)
            elapsed = time.perf_counter() - t0
            for layer in missing:
                m = {
                    "key": keys[layer], "model_sha256": lm.sha256, "layer": str(layer),
                    "module": lm.spec.rewrite(layer), "corpus": src.name,
                    "corpus_sha256": src.sha256, "sampling": how.mode,
                    "n_tokens": str(tokens.n_tokens), **mode_meta,
                    "dtype": str(lm.dtype), "accum_dtype": str(accum_dtype),
                    "version": STATS_VERSION if how.mode == "tokens" else RECORDS_VERSION,
                    "compute_s": f"{elapsed:.3f}",
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
    *,
    sampling: str = "tokens",
    n_records: int = 100_000,
) -> dict[int, Tensor]:
    """``{layer: C0}`` with ``C0 = E[k k^T]`` ``(d_in, d_in)``; see :func:`second_moment_stats`
    (which also returns the cache keys and provenance metadata)."""
    return second_moment_stats(lm, layers, corpus, n_tokens, seq_len, batch_size, accum_dtype,
                               show_progress, sampling=sampling, n_records=n_records).C0


def stats_provenance(lm: LoadedModel, layers: Sequence[int], corpus: str | Path | None = None,
                     n_tokens: int = 100_000, seq_len: int = 256,
                     accum_dtype: torch.dtype = torch.float32, *, sampling: str = "tokens",
                     n_records: int = 100_000) -> dict[str, Any]:
    """Provenance of already cached statistics (key, file, and stored metadata per layer),
    without computing anything; layers not cached map to ``{"key": ..., "cached": False}``."""
    from safetensors import safe_open

    src = resolve_corpus(corpus)
    layers = sorted({int(x) for x in layers})
    keys, _ = _plan_keys(lm, layers, src, Sampling(sampling, n_tokens, seq_len, n_records),
                         accum_dtype)
    out: dict[str, Any] = {}
    for layer in layers:
        key = keys[layer]
        path = stats_dir() / f"{key}.safetensors"
        entry: dict[str, Any] = {"key": key, "file": str(path), "cached": path.is_file()}
        if path.is_file():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                entry.update(f.metadata() or {})
        out[str(layer)] = entry
    return out


def cached_projector(lm: LoadedModel, layer: int, C0: Tensor, key: str, threshold: float,
                     compute: Callable[[Tensor, float], Tensor]) -> Tensor:
    """AlphaEdit's null-space projector ``P = U0 U0^T`` (``(d_in, d_in)``, float32, on
    ``lm.device``) of ``C0``, cached on disk by (stats ``key``, ``threshold``).

    ``compute(C0, threshold)`` makes it on a cache miss (the method layer passes
    :func:`methods.solvers.nullspace_projector`: ``U0`` are the eigenvectors of ``C0`` with
    eigenvalue below ``threshold``). ``key`` must be the stats key of ``C0``
    (``StatsResult.keys[layer]``); the eigendecomposition of a large ``C0`` (e.g. 14336^2) is
    the expensive part this cache saves.
    """
    pkey = hashlib.sha256(json.dumps({"stats_key": key, "threshold": float(threshold),
                                      "kind": "nullspace"}, sort_keys=True).encode()).hexdigest()
    path = stats_dir() / f"projector-{pkey}.safetensors"
    d_in = C0.shape[-1]
    with key_lock(cache_dir() / "locks", [f"projector-{pkey}"]):
        got = _load(path, "P", lm.device)
        if got is not None and tuple(got[0].shape) == (d_in, d_in):
            return got[0]
        P = compute(C0, threshold).to(torch.float32)
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


# ---------------------------------------------------------------------------------------------
# Command line: C0 of given layers (e.g. for comparing with the original code's C0)
# ---------------------------------------------------------------------------------------------


def selected_records(corpus: str | Path | None, n_records: int, unit: str = "records"
                     ) -> tuple[list[int], list[str], int]:
    """``(indices, texts, n_available)`` of the records a records-mode call with
    ``n_records`` uses (before tokenisation): the exact inputs to feed another implementation."""
    check_sampling(unit)
    if unit == "tokens":
        raise UserError("selected_records needs stats_sampling records or lines")
    texts = corpus_records(resolve_corpus(corpus), unit)
    idx = select_records(len(texts), n_records)
    return idx, [texts[i] for i in idx], len(texts)


def build_parser() -> Any:
    """The command line of :func:`main` (option names as the hparams keys: ``stats_*``)."""
    import argparse

    from harness.helptext import HelpFormatter

    ap = argparse.ArgumentParser(prog="python -m harness.stats", description=main.__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="as keh run --model")
    ap.add_argument("--layers", required=True, type=lambda v: [int(x) for x in v.split(",")],
                    help="comma-separated layer indices")
    # the hparams keys' names (stats_*), the older short names kept as aliases
    ap.add_argument("--stats-sampling", "--sampling", dest="sampling", default="records",
                    help="/".join(SAMPLING_MODES))
    ap.add_argument("--stats-records", "--records", dest="records", type=int, default=200,
                    help="records (records/lines modes)")
    ap.add_argument("--stats-tokens", "--tokens", dest="tokens", type=int, default=100_000,
                    help="tokens (tokens mode)")
    ap.add_argument("--stats-seq-len", "--seq-len", dest="seq_len", type=int, default=256,
                    help="chunk length (tokens mode)")
    ap.add_argument("--stats-corpus", "--corpus", dest="corpus", default=None,
                    help="text file or hf:<name>[:config][:split] (default: WikiText-2 "
                         "validation in the data directory)")
    ap.add_argument("--device", default="auto", help="as keh run --device")
    ap.add_argument("--dtype", default="float32", help="as keh run --dtype")
    ap.add_argument("--out", default=None, help="safetensors file for the C0 matrices")
    ap.add_argument("--records-out", default=None, help="JSON file for the record texts used")
    return ap


def main(argv: Sequence[str] | None = None, lm: LoadedModel | None = None) -> int:
    """``python -m harness.stats --model M --layers 4,5 [--sampling records --records 200]
    [--corpus FILE] [--out C0.safetensors] [--records-out records.json]``: compute (or read
    from the cache) C0 of the layers and write them as ``C0.<layer>`` tensors with the
    provenance as metadata; ``--records-out`` writes the record texts used as JSON."""
    from harness.models import load_model

    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        check_sampling(args.sampling)
        if lm is None:  # tests pass a loaded model
            lm = load_model(args.model, device=args.device, dtype=args.dtype)
        t0 = time.perf_counter()
        res = second_moment_stats(lm, args.layers, args.corpus, args.tokens, args.seq_len,
                                  sampling=args.sampling, n_records=args.records)
        elapsed = time.perf_counter() - t0
    except UserError as exc:
        print(f"error: {exc}")
        return 2
    prov = res.provenance()
    print(json.dumps({"seconds": round(elapsed, 3), "layers": prov}, indent=1))
    if args.out:
        _save_atomic(Path(args.out), {f"C0.{layer}": c for layer, c in res.C0.items()},
                     {"provenance": json.dumps(prov, sort_keys=True)})
    if args.records_out and args.sampling != "tokens":
        idx, texts, available = selected_records(args.corpus, args.records, args.sampling)
        Path(args.records_out).write_text(json.dumps(
            {"unit": args.sampling, "n_available": available, "indices": idx,
             "texts": texts}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
