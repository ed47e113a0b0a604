"""The stages, shared by the Celery tasks and the one-machine runner (neither has logic of
its own). Each module reads top to bottom, in numbered steps:

- `jobs`: submit (register a job and send its ingest), cancel, retry, and the reaper.
- `ingest`: stream a manifest into items (a bad row fails alone).
- `embed`: the reference embeddings every item needs, cached by content.
- `generate`: batched diffusers calls, images uploaded and recorded.
- `scoring`: CLIP-I / CLIP-T of images against references and a prompt.
- `common`: what several stages share.

Items are claimed with `workers.claims.claimed` and errors decided by `core.errors.classify`.
"""
