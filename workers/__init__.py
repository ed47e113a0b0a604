"""Stages, the Celery app and tasks, the producer and the one-machine runner."""
