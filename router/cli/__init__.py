"""The ``llamas`` command line (``router.cli.main:main``); ``python -m router.cli`` runs it too."""
