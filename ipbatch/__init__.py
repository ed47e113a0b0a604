"""ipbatch: batch IP-Adapter image generation on a job queue.

This package is the command line (`ipbatch ...`) and what it prints: status and the HTML
report. Below it: `workers` (the stages, Celery, the producer and the one-machine runner),
then `pipeline` (the domain: manifests, models, embedders, the generator) and `storage` (the
ledger, object stores, the embedding cache), then `core` (settings, errors, URIs).
"""

__version__ = "0.1.0"
