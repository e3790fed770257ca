"""The chaos suite: the real service under faults and abuse, audited from the ledger after each scenario.

``pytest tests/chaos`` runs the quick part (SQLite, small sizes);
``LLAMAS_CHAOS_FULL=1 pytest tests/chaos`` (``make chaos``) runs everything at
full size on SQLite and PostgreSQL, plus the long Hypothesis state machine.
"""
