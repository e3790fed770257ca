"""The herder process: ``celery -A router worker -Q herder -B``.

The Celery app and its thin tasks, the real parts a process wires into the
core's ``HerderService`` (Celery transport, token counter, herd reader), the
reader of the workers' results stream, and the in-process stub of all that.
"""
