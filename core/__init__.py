"""What every layer may import: settings, errors (and the one error policy), URIs.

Imports go one way: the command line (`ipbatch`) -> `workers` -> `pipeline` | `storage` ->
`core`. `make lint` checks it (import-linter, the contract in pyproject.toml).
"""
