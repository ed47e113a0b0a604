"""What tests share: the `ipbatch` command, throwaway services, jobs, clocks, an S3 proxy.

Imported as `helpers.<module>` (pyproject's pytest `pythonpath` holds `tests/`). Fixtures live
in the conftest files; everything else lives here.
"""
