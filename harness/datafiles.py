"""The data files keh reads: where each lives in the data directory, where it is published, its
pinned SHA-256, record count and format. ``keh data list`` and ``keh data fetch`` read this
table; nothing else downloads data.

Pinned hashes are those of the files the harness was developed and tested with (the shared
offline copies). A file with ``sha256=None`` is supported but not pinned: ``keh data fetch``
records the hash it got in ``<data dir>/SHA256SUMS`` and ``keh data list`` checks it from then
on. A file with no ``source`` is not published at a plain URL (EasyEdit's splits are in an
archive on Google Drive): it comes from a mirror (``--mirror``) or by hand.

A mirror is any HTTP(S) base URL holding the data directory's layout (``<mirror>/<path>``):
its files are the final ones, checked against the pins, never converted.

Each file has a role. ``required``: a run of its suite reads it. ``alternative``: the suite
reads the first of its alternatives present (the table's order, which is the suite's own
order of preference), so one is enough. ``companion``: fetched with the file it serves
(ROME's attribute snippets beside the canonical CounterFact). ``extra``: read by nothing by
default (the held-out CounterFact split for layer sweeps, WikiText-2's test text); fetched
only when asked for (``keh data fetch --all``).
"""

from __future__ import annotations

from dataclasses import dataclass

#: ROME/MEMIT's data site (CounterFact, zsRE, attribute snippets)
ROME_SITE = "https://rome.baulab.info/data/dsets"
#: AlphaEdit's repository at the commit whose GLUE/MMLU subsets were converted to JSON lines
ALPHAEDIT_COMMIT = "f5248d3d25f1b3863bff19c387293d635866079f"
ALPHAEDIT_GLUE = (f"https://raw.githubusercontent.com/jianghoucheng/AlphaEdit/{ALPHAEDIT_COMMIT}"
                  f"/glue_eval/dataset")
#: WikiText-2 (v1, tokenised, ``<unk>`` kept), the archive its authors publish
WIKITEXT2_ZIP = "https://wikitext.smerity.com/wikitext-2-v1.zip"

#: how a download becomes the file keh reads
CONVERSIONS = {
    None: "used as downloaded",
    "zip-member": "one member of a zip archive",
    "pickle-records": "a pickled list of records (built-in types only) written as JSON lines",
}


@dataclass(frozen=True)
class Source:
    """Where a file is published, and how the download becomes the file keh reads."""

    url: str
    #: SHA-256 of the download itself (None: only the converted file is checked)
    sha256: str | None = None
    #: a key of :data:`CONVERSIONS`
    convert: str | None = None
    #: the archive member to extract (``convert="zip-member"``)
    member: str | None = None


@dataclass(frozen=True)
class DataFile:
    """One file of the data directory."""

    suite: str
    path: str
    what: str
    fmt: str
    records: int | None
    sha256: str | None
    source: Source | None
    #: required | alternative | companion | extra (module docstring)
    role: str = "required"
    #: for a companion: the path of the file it serves
    serves: str | None = None


ROLES = ("required", "alternative", "companion", "extra")


def _glue(name: str, what: str, records: int, sha: str, pkl_sha: str) -> DataFile:
    return DataFile("downstream", f"glue/{name}.jsonl", what, "JSON lines", records, sha,
                    Source(f"{ALPHAEDIT_GLUE}/{name}.pkl", pkl_sha, "pickle-records"))


FILES: tuple[DataFile, ...] = (
    DataFile("counterfact", "counterfact/counterfact-edit.json",
             "CounterFact, EasyEdit/KnowEdit split 'edit' (the default cases)",
             "JSON list, KnowEdit format", 10000,
             "bfe31a7081932739406e282bb625d74222549c3386c15b1df3dfbc3978c69eec", None,
             "alternative"),
    DataFile("counterfact", "counterfact/counterfact-val.json",
             "CounterFact, EasyEdit/KnowEdit split 'val' (held out, for layer sweeps)",
             "JSON list, KnowEdit format", 1919,
             "42b44645471020a9419d183deb9e113e82941380046861770ea0083dabd13982", None, "extra"),
    DataFile("counterfact", "counterfact/counterfact.json",
             "CounterFact as released with ROME (2 paraphrases, 10 neighbourhood prompts)",
             "JSON list, ROME format", None, None, Source(f"{ROME_SITE}/counterfact.json"),
             "alternative"),
    DataFile("counterfact", "counterfact/attribute_snippets.json",
             "ROME's reference texts for the consistency metric (Consis)",
             "JSON list of snippets", None, None,
             Source(f"{ROME_SITE}/attribute_snippets.json"), "companion",
             "counterfact/counterfact.json"),
    DataFile("zsre", "zsre/zsre_mend_eval.json",
             "zsRE evaluation split as released with ROME/MEMIT (MEND's questions)",
             "JSON list, MEND format", None, None, Source(f"{ROME_SITE}/zsre_mend_eval.json"),
             "alternative"),
    DataFile("zsre", "zsre/zsre-mend-1k.json",
             "zsRE, 1,000 records of MEND's train split (the shared offline copy)",
             "JSON list, MEND format", 1000,
             "e62596101d8ed551889c26c0d2a5277f92eaef3b14416d8eaee39b04a244ab60", None,
             "alternative"),
    _glue("sst2", "SST-2 validation subset", 856,
          "8aa61c5d88ca36c5814ca3696f9acadf3444dc10accb4c7fad4183d4418f00c3",
          "e09e2cc85b7182b322012f93951b3c12f5efacd455955675bb9af81433c58b7a"),
    _glue("mrpc", "MRPC validation subset", 258,
          "32af700f8111094784dd09bba7e40482d297dde7b0372edb44bfb9a78bbafd03",
          "11c20371e9e078397de2c5005d7358649ff7a6e830eac5af05bd232f4113875a"),
    _glue("cola", "CoLA validation subset", 644,
          "1b8fc5f486e74424780f676703080a7aecb4bd9f6d782db52e6ea3b6c7ef3316",
          "60647626a1552b7070495ae919603a35ba04474b106d132b47067b7884bb6dc3"),
    _glue("rte", "RTE validation subset", 262,
          "6cf589c0f6cae4785bc1304525f509d3aa8a0f7dd36aed8b2344b059f2bd24fa",
          "f7e6b18e88067019e3ca5bddd4c6e54db35542f2822e72b34f7216441508eb84"),
    _glue("nli", "MNLI-style entailment pairs", 2489,
          "c31efa109118b56091fa774d26eafead7a9c5e2cf057952d50355b1b25d26cfc",
          "758f03cb511f1e5658648942818e35977998134a8ef35d46f475389b95c7e19b"),
    _glue("mmlu", "MMLU test subset", 1516,
          "65773f92c1a7c59db21742a229bd0a85f4184d78fb14befad4bf2fd46050d75c",
          "fda21bebe7a7cdbaaac856ddb6e214bb78808ab845b64f25c5bf111474c6e715"),
    DataFile("wikitext", "wikitext-2/valid.txt",
             "WikiText-2 validation text: the corpus of the key statistics (C0)",
             "text", None, "fad4e864edb80cad960afa6d709a3aef79466ed3b14cd39588ec0e677f874835",
             Source(WIKITEXT2_ZIP, None, "zip-member", "wikitext-2/wiki.valid.tokens")),
    DataFile("wikitext", "wikitext-2/test.txt", "WikiText-2 test text", "text", None,
             "de76f21c9c9ffd6daaa88626bf8685824cc7427b401d5d2af3958a060d161a38",
             Source(WIKITEXT2_ZIP, None, "zip-member", "wikitext-2/wiki.test.tokens"), "extra"),
)

#: the suites of :data:`FILES`, in order (``downstream``: the lm-eval tasks; ``wikitext``: the
#: statistics corpus)
SUITES: tuple[str, ...] = tuple(dict.fromkeys(f.suite for f in FILES))


def files_of(suites: list[str] | None = None) -> list[DataFile]:
    """The files of ``suites`` (all when None or empty), in table order."""
    from harness.errors import UserError

    unknown = sorted(set(suites or ()) - set(SUITES))
    if unknown:
        raise UserError(f"unknown data suite(s) {', '.join(unknown)} (known: "
                        f"{', '.join(SUITES)})")
    return [f for f in FILES if not suites or f.suite in suites]
