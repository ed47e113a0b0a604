"""The domain: manifest schema, model presets and loading, embedders and the generator.

Nothing here knows about Celery or SQL.
"""
