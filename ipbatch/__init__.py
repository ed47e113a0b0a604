"""ipbatch: batch IP-Adapter image generation on a job queue.

The packages: `pipeline` (the domain: manifests, models, embedders, the generator),
`storage` (the ledger, object stores, the embedding cache), `workers` (the stages, Celery,
the producer and the one-machine runner). This package holds what they share: settings,
errors and the command line.
"""

__version__ = "0.1.0"
