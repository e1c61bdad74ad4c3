"""DVC stage scripts: run as `python -m stages.<name>` from the repository root (see dvc.yaml).

Importing this package first installs the file-open audit when ``MEDMERGE_AUDIT_OPENS`` asks for it, so
that every module a stage imports is recorded along with every file it reads (``medmerge.audit``).
"""

from medmerge.audit import install_from_environment

install_from_environment()
