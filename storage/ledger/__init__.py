"""The ledger's repository functions, one module per aggregate. The session comes first and
arguments go by keyword; callers own the transaction (`with sessions.begin() as session:`) and
pass the time (`now=`), so tests can move it.

- `db`: engines and sessions.
- `items`: the one place item statuses change (`transition`), claims with leases and fencing
  tokens, heartbeats, what the reaper looks for.
- `counters`: per-job status counts kept with every move (what `job_progress` reads).
- `bulk`: loading a manifest's rows as items (COPY on PostgreSQL).
- `jobs`: jobs, their moves and the ingest's claim on a job; cancel and retry.
- `embeddings`: the embedding cache's index and each item's links to it.
- `outputs`: recording an item's images in the transaction that marks it succeeded.
- `queries`: read-only questions for `ipbatch status`, `ipbatch report` and the metrics.
"""
