"""harness.stats: key second moments on the tiny random Llama, cache behaviour, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import harness.corpus as hc
import harness.stats as stats
from harness.errors import UserError

N_TOKENS = 1000  # not a multiple of SEQ_LEN: exercises the shorter last chunk
SEQ_LEN = 64


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("KEH_CACHE", str(tmp_path / "cache"))
    words = ["lobster", "Atlantic", "river", "castle", "1850", "music", "the", "of", "and", ","]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8 + i % 13)) + " ."
             for i in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _direct_C0(lm, layer, tokens):
    """Reference: all keys via a plain pre-hook and full forward passes of the transformer body
    (one chunk at a time; the LM head does not affect keys), K^T K / N in float64."""
    keys = []
    module = lm.model.get_submodule(lm.spec.rewrite(layer))
    h = module.register_forward_pre_hook(lambda _m, args: keys.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            for chunk in tokens.chunks:
                lm.model.base_model(input_ids=chunk[None])
    finally:
        h.remove()
    K = torch.cat([k[0, tokens.n_prefix:] for k in keys]).double()
    assert K.shape[0] == tokens.n_tokens
    return (K.T @ K / K.shape[0]).float()


def test_c0_matches_direct_computation(tiny_lm, corpus):
    C0 = stats.second_moments(tiny_lm, [1, 3], corpus, n_tokens=N_TOKENS, seq_len=SEQ_LEN,
                              batch_size=4, show_progress=False)
    tokens = hc.corpus_chunks(tiny_lm, corpus, N_TOKENS, SEQ_LEN)
    assert tokens.n_tokens == N_TOKENS
    assert [c.numel() for c in tokens.chunks] == [64] * 15 + [40]
    for layer in (1, 3):
        ref = _direct_C0(tiny_lm, layer, tokens)
        assert C0[layer].shape == (128, 128) and C0[layer].dtype == torch.float32
        assert C0[layer].device == tiny_lm.device
        err = (C0[layer] - ref).abs().max() / ref.abs().max()
        assert err < 1e-5, (layer, err)


def test_early_stop_equals_full_forward(tiny_lm, corpus):
    tokens = hc.corpus_chunks(tiny_lm, corpus, N_TOKENS, SEQ_LEN)
    early = stats.accumulate_second_moments(tiny_lm, [0, 2], tokens, batch_size=8,
                                            show_progress=False)
    full = stats.accumulate_second_moments(tiny_lm, [0, 2], tokens, batch_size=8,
                                           early_stop=False, show_progress=False)
    for layer in (0, 2):
        torch.testing.assert_close(early[layer], full[layer], rtol=1e-6, atol=1e-7)


def test_symmetric_psd(tiny_lm, corpus):
    C0 = stats.second_moments(tiny_lm, [2], corpus, n_tokens=N_TOKENS, seq_len=SEQ_LEN,
                              show_progress=False)[2]
    assert torch.equal(C0, C0.T)
    evals = torch.linalg.eigvalsh(C0.double())
    assert evals.min() >= -1e-6 * evals.max()
    assert torch.isfinite(C0).all()


@pytest.mark.parametrize("d", [1, 64, 300, 1024, 1537])
def test_block_upper_rank_update_is_exact(d):
    torch.manual_seed(d)
    k1, k2 = torch.randn(70, d, dtype=torch.float64), torch.randn(9, d, dtype=torch.float64)
    S = torch.zeros(d, d, dtype=torch.float64)
    stats._sym_rank_update(S, k1)
    stats._sym_rank_update(S, k2)
    C = stats._symmetric_from_upper(S)
    torch.testing.assert_close(C, k1.T @ k1 + k2.T @ k2)
    assert torch.equal(C, C.T)


def test_cache_hit_and_partial_reuse(tiny_lm, corpus, tmp_path, monkeypatch):
    calls = []
    real = stats.accumulate_second_moments

    def counting(lm, layers, *args, **kwargs):
        calls.append(list(layers))
        return real(lm, layers, *args, **kwargs)

    monkeypatch.setattr(stats, "accumulate_second_moments", counting)
    kw = dict(n_tokens=N_TOKENS, seq_len=SEQ_LEN, show_progress=False)
    first = stats.second_moment_stats(tiny_lm, [3, 1], corpus, **kw)
    assert calls == [[1, 3]] and first.computed == [1, 3]
    files = sorted((tmp_path / "cache" / "stats").iterdir())
    assert len(files) == 2 and all(f.suffix == ".safetensors" for f in files)  # no temp left

    again = stats.second_moment_stats(tiny_lm, [1, 3], corpus, **kw)
    assert calls == [[1, 3]] and again.computed == []
    for layer in (1, 3):
        torch.testing.assert_close(again.C0[layer], first.C0[layer], rtol=0, atol=0)
        assert again.keys[layer] == first.keys[layer]

    more = stats.second_moment_stats(tiny_lm, [0, 1, 3], corpus, **kw)
    assert calls == [[1, 3], [0]] and more.computed == [0]
    fresh = real(tiny_lm, [0], hc.corpus_chunks(tiny_lm, corpus, N_TOKENS, SEQ_LEN),
                 show_progress=False)
    torch.testing.assert_close(more.C0[0], fresh[0])

    # a different n_tokens or seq_len is a different key
    stats.second_moment_stats(tiny_lm, [1], corpus, n_tokens=500, seq_len=SEQ_LEN,
                              show_progress=False)
    assert calls[-1] == [1]

    prov = more.provenance()
    assert json.loads(json.dumps(prov)) == prov
    assert prov["0"]["cached"] is False and prov["1"]["cached"] is True
    assert prov["1"]["n_tokens"] == N_TOKENS
    with safe_open(str(more.paths[1]), framework="pt", device="cpu") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"C0"}
    assert meta["n_tokens"] == str(N_TOKENS)
    assert meta["corpus_sha256"] == hc.resolve_corpus(corpus).sha256
    assert meta["key"] == more.keys[1]
    assert stats.stats_provenance(tiny_lm, [1, 2], corpus, **{
        k: v for k, v in kw.items() if k != "show_progress"})["2"]["cached"] is False


def test_key_depends_on_its_fields(tiny_lm):
    base = stats.stats_key(tiny_lm, 1, "c" * 64, 1000, 64)
    assert base == stats.stats_key(tiny_lm, 1, "c" * 64, 1000, 64)
    others = {stats.stats_key(tiny_lm, 2, "c" * 64, 1000, 64),
              stats.stats_key(tiny_lm, 1, "d" * 64, 1000, 64),
              stats.stats_key(tiny_lm, 1, "c" * 64, 1001, 64),
              stats.stats_key(tiny_lm, 1, "c" * 64, 1000, 65),
              stats.stats_key(tiny_lm, 1, "c" * 64, 1000, 64, torch.float64)}
    assert base not in others and len(others) == 5


def test_corrupt_cache_file_is_recomputed(tiny_lm, corpus):
    kw = dict(n_tokens=N_TOKENS, seq_len=SEQ_LEN, show_progress=False)
    first = stats.second_moment_stats(tiny_lm, [1], corpus, **kw)
    first.paths[1].write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        again = stats.second_moment_stats(tiny_lm, [1], corpus, **kw)
    assert again.computed == [1]
    torch.testing.assert_close(again.C0[1], first.C0[1])


def test_missing_corpus_errors(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("KEH_CACHE", str(tmp_path / "cache"))
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError, match=r"nope\.txt does not exist"):
        stats.second_moments(tiny_lm, [0], missing, n_tokens=10, show_progress=False)
    monkeypatch.setenv("KEH_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"wikitext-2/valid\.txt not found.*KEH_DATA_DIR"):
        stats.second_moments(tiny_lm, [0], None, n_tokens=10, show_progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="holds no text"):
        stats.second_moments(tiny_lm, [0], empty, n_tokens=10, show_progress=False)
    with pytest.raises(UserError, match="expected 'hf:<name>"):
        hc.resolve_corpus("hf:")


def test_hf_corpus_offline_error(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("KEH_CACHE", str(tmp_path / "cache"))  # conftest sets HF offline mode
    with pytest.raises(UserError, match="needs network access"):
        stats.second_moments(tiny_lm, [0], "hf:wikitext:wikitext-2-raw-v1:validation",
                             n_tokens=10, show_progress=False)


def test_short_corpus_warns_and_uses_all(tiny_lm, corpus):
    with pytest.warns(UserWarning, match="has only"):
        tokens = hc.corpus_chunks(tiny_lm, corpus, 10**7, SEQ_LEN)
    assert 1000 < tokens.n_tokens < 10**7
    assert sum(c.numel() for c in tokens.chunks) == tokens.n_tokens


def test_bos_prefix_is_context_not_sample(tiny_lm, corpus):
    class BosTokenizer:
        """SmolLM2's tokenizer, but adding BOS (id 1) to plain inputs like Llama/Gemma ones."""

        bos_token_id = 1

        def __call__(self, text, add_special_tokens=True, **kw):
            out = tiny_lm.tokenizer(text, add_special_tokens=False, **kw)
            if add_special_tokens:
                out["input_ids"] = [1, *out["input_ids"]]
            return out

    tokens = hc.tokenize_corpus(BosTokenizer(), hc.resolve_corpus(corpus), 500, 32)
    assert tokens.n_prefix == 1 and tokens.n_tokens == 500
    assert all(int(c[0]) == 1 for c in tokens.chunks)
    assert sum(c.numel() - 1 for c in tokens.chunks) == 500
    got = stats.accumulate_second_moments(tiny_lm, [1], tokens, show_progress=False)[1]
    ref = _direct_C0(tiny_lm, 1, tokens)
    assert ((got - ref).abs().max() / ref.abs().max()) < 1e-5


def test_default_corpus_from_data_dir(tiny_lm, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("KEH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KEH_DATA_DIR", str(shared_data))
    res = stats.second_moment_stats(tiny_lm, [0], None, n_tokens=300, seq_len=SEQ_LEN,
                                    show_progress=False)
    assert res.meta[0]["corpus"].endswith("valid.txt")
    assert res.meta[0]["n_tokens"] == "300"


def test_cached_projector(tiny_lm, corpus):
    from methods.solvers import nullspace_projector

    res = stats.second_moment_stats(tiny_lm, [1], corpus, n_tokens=N_TOKENS, seq_len=SEQ_LEN,
                                    show_progress=False)
    C0, key = res.C0[1], res.keys[1]
    threshold = float(torch.linalg.eigvalsh(C0.double()).median())
    P = stats.cached_projector(tiny_lm, 1, C0, key, threshold, nullspace_projector)
    torch.testing.assert_close(P, nullspace_projector(C0, threshold).float())
    assert P.shape == (128, 128) and P.dtype == torch.float32

    def boom(*_a, **_k):
        raise AssertionError("projector recomputed despite the cache")

    torch.testing.assert_close(stats.cached_projector(tiny_lm, 1, C0, key, threshold, boom), P)
    with pytest.raises(AssertionError, match="recomputed"):  # another threshold: new entry
        stats.cached_projector(tiny_lm, 1, C0, key, threshold * 2, boom)


def test_benchmark_stats_smoke(tiny_lm, corpus):
    out = stats.benchmark_stats(tiny_lm, [0, 1], n_tokens=256, corpus=corpus, seq_len=64,
                                batch_size=2)
    assert out["n_tokens"] == 256
    for k in ("forward_tok_s", "forward_no_head_tok_s", "stats_tok_s", "ratio"):
        assert out[k] > 0


@pytest.mark.slow
def test_smollm2_stats_shape_and_psd(smollm2, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("KEH_CACHE", str(tmp_path / "cache"))
    C0 = stats.second_moments(smollm2, [4, 5], shared_data / "wikitext-2" / "valid.txt",
                              n_tokens=2048, seq_len=256, show_progress=False)
    for layer in (4, 5):
        d_in = smollm2.rewrite_weight(layer).shape[1]
        assert C0[layer].shape == (d_in, d_in)
        torch.testing.assert_close(C0[layer], C0[layer].T)
        evals = torch.linalg.eigvalsh(C0[layer].double())
        assert evals.min() >= -1e-6 * evals.max()


# ---------------------------------------------------------------------------------------------
# Records modes (the original's sampling)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def wiki(tmp_path, monkeypatch):
    """A WikiText-like file: 5 articles of varied length with section headings and blanks."""
    monkeypatch.setenv("KEH_CACHE", str(tmp_path / "cache"))
    words = ["lobster", "Atlantic", "river", "castle", "1850", "music", "the", "of", "and", ","]
    parts = [" \n"]
    for a in range(5):
        parts += [f" = Article {a} = \n", " \n"]
        for p in range(1 + a):
            parts.append(" " + " ".join(words[(a * 5 + p * 3 + j) % len(words)]
                                        for j in range(6 + 7 * p + a)) + " . \n")
            parts.append(" \n")
            if p == 1:
                parts += [" = = Section = = \n", " \n"]
    path = tmp_path / "wiki.txt"
    path.write_text("".join(parts), encoding="utf-8")
    return path


def _direct_records_C0(lm, layer, texts):
    """Reference: each record alone (tokenised with special tokens, no padding), every position
    a sample; sum k k^T over all positions of all records / count, in float64."""
    keys = []
    module = lm.model.get_submodule(lm.spec.rewrite(layer))
    h = module.register_forward_pre_hook(lambda _m, args: keys.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            for text in texts:
                ids = lm.tokenizer(text, truncation=True,
                                   max_length=hc.context_length(lm.model.config))["input_ids"]
                lm.model.base_model(input_ids=torch.tensor([ids]))
    finally:
        h.remove()
    K = torch.cat([k[0] for k in keys]).double()
    return (K.T @ K / K.shape[0]).float(), K.shape[0]


def test_split_articles_and_lines(wiki):
    src = hc.resolve_corpus(wiki)
    arts = hc.corpus_records(src, "records")
    assert len(arts) == 5
    assert arts[0].startswith(" = Article 0 = \n") and arts[0].endswith(" . \n")
    assert " = = Section = = \n" in arts[3] and arts[3].count(" = Article") == 1
    lines = hc.corpus_records(src, "lines")
    assert all(line.strip() for line in lines)
    assert len(lines) == 5 + 15 + 4  # titles, paragraphs, section headings
    assert hc.split_articles(["text before\n", " = T = \n", "body\n", " \n"]) == \
        ["text before\n", " = T = \nbody\n"]


@pytest.mark.parametrize("unit", ["records", "lines"])
def test_records_c0_matches_direct_computation(tiny_lm, wiki, unit):
    res = stats.second_moment_stats(tiny_lm, [1, 3], wiki, sampling=unit, n_records=1000,
                                    batch_tokens=64, show_progress=False)
    texts = hc.corpus_records(hc.resolve_corpus(wiki), unit)
    for layer in (1, 3):
        ref, count = _direct_records_C0(tiny_lm, layer, texts)
        assert int(res.meta[layer]["n_tokens"]) == count
        err = (res.C0[layer] - ref).abs().max() / ref.abs().max()
        assert err < 1e-5, (layer, err)
    prov = res.provenance()["1"]
    assert prov["sampling"] == unit and prov["n_records"] == len(texts)
    assert prov["n_records_requested"] == 1000 and prov["n_records_available"] == len(texts)


def test_records_subset_is_the_originals_and_warns_when_short(tiny_lm, wiki):
    import random

    idx = list(range(24))
    random.Random(1).shuffle(idx)
    assert hc.select_records(24, 5) == sorted(idx[:5])
    assert hc.select_records(24, 30) == list(range(24))
    with pytest.raises(UserError, match="stats_records must be at least 1"):
        hc.select_records(24, 0)
    src = hc.resolve_corpus(wiki)
    got = hc.tokenize_records(tiny_lm.tokenizer, src, 3, 10_000, "lines")
    assert got.indices == hc.select_records(24, 3) and got.n_records == 3
    with pytest.warns(UserWarning, match="has only 5 records"):
        got = hc.tokenize_records(tiny_lm.tokenizer, src, 100, 10_000, "records")
    assert got.n_records == 5
    short = hc.tokenize_records(tiny_lm.tokenizer, src, 5, 7, "records")
    assert max(r.numel() for r in short.records) == 7  # truncated to the context length


def test_records_batches_pad_and_mask():
    recs = [torch.arange(n) + 1 for n in (3, 7, 5, 2, 7)]
    tr = hc.TokenRecords(records=recs, max_len=8, n_available=5, indices=list(range(5)),
                            unit="records")
    batches = list(tr.batches(14))
    assert [tuple(b.shape) for b, _ in batches] == [(2, 7), (2, 5), (1, 2)]
    assert sum(int(k.sum()) for _, k in batches) == tr.n_tokens == 24
    ids, keep = batches[1]
    assert keep.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert ids[1, 3:].tolist() == [0, 0]


def test_sampling_modes_have_different_keys_and_files(tiny_lm, wiki):
    a = stats.second_moment_stats(tiny_lm, [1], wiki, n_tokens=300, seq_len=32,
                                  show_progress=False)
    b = stats.second_moment_stats(tiny_lm, [1], wiki, sampling="records", n_records=5,
                                  show_progress=False)
    c = stats.second_moment_stats(tiny_lm, [1], wiki, sampling="lines", n_records=5,
                                  show_progress=False)
    d = stats.second_moment_stats(tiny_lm, [1], wiki, sampling="records", n_records=3,
                                  show_progress=False)
    assert len({a.keys[1], b.keys[1], c.keys[1], d.keys[1]}) == 4
    assert not torch.equal(b.C0[1], d.C0[1])
    # more records than exist: the count used (5) is the key, so it is a cache hit
    e = stats.second_moment_stats(tiny_lm, [1], wiki, sampling="records", n_records=10**5,
                                  show_progress=False)
    assert e.keys[1] == b.keys[1] and e.computed == []
    assert stats.stats_provenance(tiny_lm, [1], wiki, sampling="records",
                                  n_records=5)["1"]["sampling"] == "records"
    with pytest.raises(UserError, match=r"stats_sampling 'docs' is not one of records, lines, "
                                        r"tokens"):
        stats.second_moment_stats(tiny_lm, [1], wiki, sampling="docs", show_progress=False)


def test_context_length_rule():
    from types import SimpleNamespace as NS

    assert hc.context_length(NS(n_positions=1024, model_type="gpt2")) == 1024
    assert hc.context_length(NS(max_position_embeddings=8192, model_type="llama")) == 8192
    assert hc.context_length(NS(max_position_embeddings=32768, model_type="mistral",
                                   sliding_window=None)) == 4096
    assert hc.context_length(NS(max_position_embeddings=32768, model_type="qwen2")) == 4096


def test_c0_command_line(tiny_lm, wiki, tmp_path, monkeypatch, capsys):
    out, recs = tmp_path / "c0.safetensors", tmp_path / "records.json"
    rc = stats.main(["--model", "random:llama-tiny", "--layers", "1,2", "--records", "3",
                     "--corpus", str(wiki), "--out", str(out), "--records-out", str(recs)],
                    lm=tiny_lm)
    assert rc == 0
    with safe_open(str(out), framework="pt", device="cpu") as f:
        assert set(f.keys()) == {"C0.1", "C0.2"}
        prov = json.loads(f.metadata()["provenance"])
        c1 = f.get_tensor("C0.1")
    assert prov["1"]["n_records"] == 3 and prov["1"]["sampling"] == "records"
    texts = json.loads(recs.read_text())["texts"]
    ref, _ = _direct_records_C0(tiny_lm, 1, texts)
    assert ((c1 - ref).abs().max() / ref.abs().max()) < 1e-5
    assert stats.main(["--layers", "1", "--sampling", "bad", "--corpus", str(wiki)]) == 2
    assert "is not one of" in capsys.readouterr().out


def test_records_count_the_bos_position(tiny_lm, wiki):
    class BosTokenizer:
        """SmolLM2's tokenizer, adding BOS (id 1) like Llama 3's: the original counts it."""

        def __call__(self, text, add_special_tokens=True, **kw):
            out = tiny_lm.tokenizer(text, add_special_tokens=False, **kw)
            out["input_ids"] = [[1, *ids] for ids in out["input_ids"]]
            return out

    src = hc.resolve_corpus(wiki)
    plain = hc.tokenize_records(tiny_lm.tokenizer, src, 5, 10_000)
    bos = hc.tokenize_records(BosTokenizer(), src, 5, 10_000)
    assert all(int(r[0]) == 1 for r in bos.records)
    assert bos.n_tokens == plain.n_tokens + 5  # one sample more per record


def test_hparams_check_the_sampling_fields():
    from methods import memit
    from methods.base import hparams_from_dict

    hp = hparams_from_dict(memit.Hparams, {"stats_sampling": "records", "stats_records": 200})
    hp.validate()
    assert (hp.stats_sampling, hp.stats_records) == ("records", 200)
    for bad, match in (({"stats_sampling": "docs"}, "stats_sampling"),
                       ({"stats_records": 0}, "stats_records")):
        with pytest.raises(UserError, match=match):
            hparams_from_dict(memit.Hparams, bad).validate()
