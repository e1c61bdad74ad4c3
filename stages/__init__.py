"""DVC stage scripts: run as `python -m stages.<name>` from the repository root (see dvc.yaml)."""
