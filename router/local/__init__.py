"""One machine's whole stack: ``llamas up`` / ``llamas down`` and the supervisor behind them."""
