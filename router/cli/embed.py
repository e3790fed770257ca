"""``llamas embed``: pay for the embeddings of one or more texts and print them."""

from __future__ import annotations

import json

import typer

from llama_tasks.registry import DEFAULT_MODEL
from router.cli.common import KEY_OPTION, err, herder, need_key, out

#: Values of each vector shown without ``--json``.
SHOWN_VALUES = 4


def embed(
    texts: list[str] = typer.Argument(..., help="Texts to embed, one vector each."),
    key: str | None = KEY_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the response document, with every vector, as JSON."),
    fee: int | None = typer.Option(None, help="Offer this absolute fee."),
    multiplier: float | None = typer.Option(None, help="Offer this multiple of the quote (default 1)."),
    deadline: float | None = typer.Option(None, help="Seconds the job may wait in the queue."),
    model: str = typer.Option(DEFAULT_MODEL),
    reference: str | None = typer.Option(None, help="Idempotency reference."),
    timeout: float = typer.Option(600.0, help="Seconds to wait for the vectors."),
) -> None:
    """Pay for the embeddings of TEXTS: base fee + fee per embedding token × input tokens."""
    # A job that ends without vectors raises ``JobFailed``: one line and exit 1, as every refusal.
    doc = herder(need_key(key)).embed(texts, model=model, fee=fee, multiplier=multiplier, reference=reference,
                                      deadline_s=deadline, timeout=timeout)
    if as_json:
        out.print_json(json.dumps(doc))
        return
    for i, vector in enumerate(doc["embeddings"]):
        shown = ", ".join(f"{v:.4f}" for v in vector[:SHOWN_VALUES])
        out.print(f"{i}\t{len(vector)} dims\t[{shown}, …]", markup=False, highlight=False)
    err.print(f"{doc['prompt_tokens']} input tokens; charged {doc['charged']}, refunded {doc['refunded']}",
              highlight=False)
