"""``keh data list`` / ``keh data fetch`` against a loopback HTTP server serving the shared data
(a mirror), and the data directory's resolution order."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import datafiles, paths
from harness.cli import main
from harness.errors import UserError
from harness.fetch import PARTIAL, pickle_records_to_jsonl, read_sums

PINNED = [f for f in datafiles.FILES if f.sha256]


class Server:
    """A loopback HTTP server over ``root`` that honours ``Range: bytes=N-`` (206), records
    every request's path and Range header, and can break off one response after ``cut``
    bytes (Content-Length still announcing the whole file)."""

    def __init__(self, root: Path) -> None:
        self.root, self.requests, self.cut = root, [], {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                rel = self.path.lstrip("/")
                server.requests.append((rel, self.headers.get("Range")))
                path = server.root / rel
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if rel in server.cut:
                    body = body[:server.cut.pop(rel)]
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mirror(shared_data) -> Iterator[Server]:
    server = Server(shared_data)
    yield server
    server.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_from_a_mirror_then_list(tmp_path, mirror, shared_data, capsys):
    target = tmp_path / "data"
    assert main(["data", "fetch", "--data-dir", str(target), "--mirror", mirror.url]) == 0
    out = capsys.readouterr().out
    # what makes each suite runnable: the KnowEdit split, zsRE's 1k file (the canonical eval
    # file, preferred, is not on the mirror), the six downstream tasks, WikiText-2 validation
    needed = [f for f in PINNED if f.role != "extra"]
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")
                  if p.is_file()) == sorted([f.path for f in needed] + ["SHA256SUMS"])
    for f in needed:  # byte for byte, recorded in SHA256SUMS
        assert (target / f.path).read_bytes() == (shared_data / f.path).read_bytes(), f.path
        assert f"  {f.path}: fetched from {mirror.url}/{f.path}, SHA-256 verified" in out
    assert read_sums(target) == {f.path: f.sha256 for f in needed}
    assert "  zsre/zsre_mend_eval.json: not on the mirror (HTTP 404)\n" in out
    assert ("  counterfact/counterfact.json: not needed (a run reads "
            "counterfact/counterfact-edit.json)\n") in out
    assert "  wikitext-2/test.txt: not needed (an extra: keh data fetch --all)\n" in out

    assert main(["data", "fetch", "--all", "--data-dir", str(target), "--mirror",
                 mirror.url]) == 0
    out = capsys.readouterr().out
    for f in PINNED:
        assert (target / f.path).read_bytes() == (shared_data / f.path).read_bytes(), f.path
    for f in datafiles.FILES:
        if not f.sha256:  # the mirror holds only the shared files
            assert f"  {f.path}: not on the mirror (HTTP 404)" in out
    assert read_sums(target) == {f.path: f.sha256 for f in PINNED}
    assert not (target / PARTIAL).exists()

    assert main(["data", "list", "--data-dir", str(target)]) == 0
    listing = capsys.readouterr().out
    assert listing.splitlines()[0] == f"data dir: {target} (--data-dir)"
    assert "counterfact; a run reads counterfact/counterfact-edit.json" in listing
    for f in PINNED:
        assert f"  {f.path}: ok\n" in listing
    assert "records 10,000; sha256 " + PINNED[0].sha256 in listing
    assert "records 2,489; sha256 c31efa10" in listing
    # a second fetch finds everything present and downloads nothing
    mirror.requests.clear()
    assert main(["data", "fetch", "downstream", "--data-dir", str(target), "--mirror",
                 mirror.url]) == 0
    assert mirror.requests == []
    assert capsys.readouterr().out.count(": present\n") == 6


def test_a_broken_transfer_is_continued_with_a_range_request(tmp_path, mirror, shared_data,
                                                             capsys):
    target = tmp_path / "data"
    rel = "counterfact/counterfact-edit.json"
    mirror.cut[rel] = 100_000
    assert main(["data", "fetch", "counterfact", "--data-dir", str(target), "--mirror",
                 mirror.url]) == 2
    err = capsys.readouterr().err
    assert f"{mirror.url}/{rel}: transfer broke off after 100000 bytes" in err
    assert not (target / rel).exists()
    assert (target / PARTIAL / rel).stat().st_size == 100_000
    mirror.requests.clear()
    assert main(["data", "fetch", "counterfact", "--data-dir", str(target), "--mirror",
                 mirror.url]) == 0
    assert (rel, "bytes=100000-") in mirror.requests
    assert (target / rel).read_bytes() == (shared_data / rel).read_bytes()
    assert not (target / PARTIAL / rel).exists()


def test_a_file_that_fails_its_pin_is_not_installed(tmp_path, shared_data, capsys):
    served = tmp_path / "served"
    (served / "glue").mkdir(parents=True)
    good = (shared_data / "glue" / "rte.jsonl").read_bytes()
    (served / "glue" / "rte.jsonl").write_bytes(good.replace(b'"label": 1', b'"label": 0', 1))
    server = Server(served)
    try:
        target = tmp_path / "data"
        assert main(["data", "fetch", "downstream", "--data-dir", str(target), "--mirror",
                     server.url]) == 2
    finally:
        server.close()
    err = capsys.readouterr().err
    want = datafiles.files_of(["downstream"])[3]
    assert want.path == "glue/rte.jsonl"
    bad = hashlib.sha256(good.replace(b'"label": 1', b'"label": 0', 1)).hexdigest()
    assert (f"keh: error: {server.url}/glue/rte.jsonl has SHA-256 {bad}, expected "
            f"{want.sha256}") in err
    assert not (target / "glue" / "rte.jsonl").exists()
    assert not (target / PARTIAL / "glue" / "rte.jsonl").exists()


MRPC = next(f for f in datafiles.FILES if f.path == "glue/mrpc.jsonl")


def fetch_published_mrpc(tmp_path, monkeypatch, records) -> tuple[int, datafiles.Source]:
    """Publish ``records`` pickled on a loopback server as MRPC's source (the download's own
    hash pinned), fetch it into ``tmp_path/data``; the exit status and the source."""
    served = tmp_path / "served"
    served.mkdir()
    (served / "mrpc.pkl").write_bytes(pickle.dumps(records, protocol=4))
    server = Server(served)
    source = datafiles.Source(f"{server.url}/mrpc.pkl", sha(served / "mrpc.pkl"),
                              "pickle-records")
    monkeypatch.setattr(datafiles, "FILES", (dataclasses.replace(MRPC, source=source),))
    try:
        return main(["data", "fetch", "--data-dir", str(tmp_path / "data")]), source
    finally:
        server.close()


def mrpc_records(shared_data) -> list[dict]:
    return [json.loads(line) for line in
            (shared_data / "glue" / "mrpc.jsonl").read_text(encoding="utf-8").splitlines()]


def test_published_pickle_is_converted_to_the_pinned_json_lines(tmp_path, shared_data,
                                                                monkeypatch, capsys):
    """The GLUE/MMLU subsets are published as pickled lists of records (AlphaEdit's
    repository); the conversion must give the pinned JSON lines byte for byte."""
    status, source = fetch_published_mrpc(tmp_path, monkeypatch, mrpc_records(shared_data))
    assert status == 0
    assert sha(tmp_path / "data" / "glue" / "mrpc.jsonl") == MRPC.sha256
    assert ("glue/mrpc.jsonl: fetched from " + source.url + ", SHA-256 verified (a pickled "
            "list of records (built-in types only) written as JSON lines)") in \
        capsys.readouterr().out


def test_a_converted_file_that_fails_its_pin_is_not_installed(tmp_path, shared_data,
                                                              monkeypatch, capsys):
    """The download matches its own hash, but what it converts to is not the pinned file."""
    records = mrpc_records(shared_data)[1:]
    status, source = fetch_published_mrpc(tmp_path, monkeypatch, records)
    assert status == 2
    got = hashlib.sha256("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                         .encode()).hexdigest()
    assert (f"keh: error: glue/mrpc.jsonl from {source.url} has SHA-256 {got}, expected "
            f"{MRPC.sha256} (the copy keh was tested with)") in capsys.readouterr().err
    assert not (tmp_path / "data" / "glue" / "mrpc.jsonl").exists()


def test_the_unpickler_refuses_globals():
    class Sneaky:
        def __reduce__(self):
            import os
            return (os.getcwd, ())

    with pytest.raises(UserError, match=r"refusing to unpickle posix\.getcwd"):
        pickle_records_to_jsonl(pickle.dumps([Sneaky()]), "x.pkl")


def test_unpinned_file_is_recorded_then_checked(tmp_path, shared_data, monkeypatch, capsys):
    served = tmp_path / "served"
    served.mkdir()
    (served / "cf.json").write_bytes((shared_data / "counterfact" /
                                      "counterfact-val.json").read_bytes())
    server = Server(served)
    entry = next(f for f in datafiles.FILES if f.path == "counterfact/counterfact.json")
    assert entry.sha256 is None
    monkeypatch.setattr(datafiles, "FILES", (dataclasses.replace(
        entry, source=datafiles.Source(f"{server.url}/cf.json")),))
    target = tmp_path / "data"
    try:
        assert main(["data", "fetch", "--data-dir", str(target)]) == 0
    finally:
        server.close()
    digest = sha(served / "cf.json")
    assert f"not pinned: SHA-256 {digest} recorded in {target / 'SHA256SUMS'}" in \
        capsys.readouterr().out
    assert read_sums(target) == {"counterfact/counterfact.json": digest}
    assert main(["data", "list", "--data-dir", str(target)]) == 0
    assert ("counterfact/counterfact.json: ok (SHA-256 recorded at fetch, not pinned)\n"
            in capsys.readouterr().out)
    with open(target / entry.path, "ab") as f:
        f.write(b" ")
    assert main(["data", "list", "--data-dir", str(target)]) == 1
    assert (f"counterfact/counterfact.json: SHA-256 MISMATCH (expected {digest[:12]}...)"
            in capsys.readouterr().out)


def test_unknown_suite_is_one_line(tmp_path, capsys):
    assert main(["data", "fetch", "glue", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("keh: error: unknown data suite(s) glue (known: "
                                       "counterfact, zsre, downstream, wikitext)\n")


def test_data_dir_order(tmp_path, monkeypatch):
    checkout = tmp_path / "keh"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text("")
    monkeypatch.setattr(paths, "CHECKOUT", checkout)
    monkeypatch.delenv("KEH_DATA_DIR", raising=False)
    assert paths.data_dir_origin() == (Path("data"), "./data (no $KEH_DATA_DIR and no "
                                       "../shared/data beside the checkout)")
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    assert paths.data_dir_origin() == (shared, "../shared/data beside the checkout")
    monkeypatch.setenv("KEH_DATA_DIR", str(tmp_path / "env"))
    assert paths.data_dir() == tmp_path / "env"
    assert paths.data_dir(tmp_path / "x") == tmp_path / "x"
    (checkout / "pyproject.toml").unlink()  # an installed package: no checkout to look beside
    monkeypatch.delenv("KEH_DATA_DIR")
    assert paths.data_dir() == Path("data")
