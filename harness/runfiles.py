"""The names of a run directory's files: one definition for the harness and the reports
(no heavy imports, so the reports can read runs without loading torch)."""

MANIFEST = "manifest.json"
RECORDS = "records.jsonl"
CURVE = "curve.jsonl"
