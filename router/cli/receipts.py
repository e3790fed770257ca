"""``llamas receipts get`` and ``llamas receipts verify``: fetch a job's signed receipt, check one offline.

``get`` asks the herder through the broker, like every request of the CLI.
``verify`` needs neither Redis nor the ledger: only the receipt and the
herder's public key (``<LLAMAS_HOME>/herder.pub`` unless one is given). Every
refusal is one red line and exit status 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.markup import escape

from llama_tasks import signing
from llama_tasks.errors import LlamasError
from router.cli.common import KEY_OPTION, err, fail, herder, need_key, read_public_key
from router.core import receipts
from router.core.settings import get_settings

receipts_app = typer.Typer(help="Signed receipts of your ended jobs: fetch one, verify one offline.",
                           no_args_is_help=True)

@receipts_app.command("get")
def get(
    job_id: str = typer.Argument(..., help="The job whose receipt to fetch (it must have ended)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the receipt to this file (default: stdout)."),
    key: str | None = KEY_OPTION,
) -> None:
    """Fetch the herder's signed receipt of one of your ended jobs, as JSON."""
    try:
        envelope = herder(need_key(key)).receipt(job_id)
    except LlamasError as exc:
        fail(str(exc))
    text = json.dumps(envelope, indent=2, ensure_ascii=False) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}")
    err.print(f"receipt of job {escape(job_id)} written to {escape(str(out))}", highlight=False, soft_wrap=True)


def _public_key(given: str | None) -> Ed25519PublicKey:
    """The key to check against: ``--public-key`` (a file or the key itself), or the home's ``herder.pub``."""
    if given is None:
        pub_file = get_settings().public_key_file
        if not pub_file.is_file():
            fail(f"no herder public key at {pub_file}: pass --public-key FILE_OR_BASE64 "
                 "(`llamas keys show` on the herder prints it)")
        given = str(pub_file)
    return read_public_key(given)


def _read(file: str) -> Any:
    try:
        raw = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        fail(f"{file} is not JSON: {exc.msg} at line {exc.lineno}")


@receipts_app.command("verify")
def verify(
    file: str = typer.Argument(..., help="The receipt's JSON file (- reads stdin)."),
    public_key: str | None = typer.Option(
        None, "--public-key", help="File holding the herder's base64 public key, or the key itself "
                                   "(default: herder.pub in LLAMAS_HOME).", show_default=False),
) -> None:
    """Check a receipt against the herder's public key, offline; exit 0 and print what it vouches for."""
    envelope = _read(file)
    key = _public_key(public_key)
    try:
        payload = receipts.verify(envelope, key)
    except LlamasError as exc:
        fail(str(exc))
    print(receipts.summary(payload, signing.key_id(key)))
