"""The dashboard and the API docs in a real browser (headless Chromium) against a real stack.

A herder with beat, a SmolLM2 worker and the HTTP gateway run as processes;
Playwright drives Debian's Chromium. Every request the page makes to
anything but the gateway is refused, so a page that needs the internet
fails here. ``LLAMAS_SCREENSHOTS`` names a folder to keep the screenshots in
(the README's come from here); otherwise they go to the test's own folder.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llama_tasks import signing
from router.core import operators
from router.core.db import make_engine, make_sessionmaker
from tests.stack import Stack, running_stack

pytestmark = pytest.mark.slow

ADMIN_KEY = "browser-test-admin-key"
#: The operator the stack's worker runs for.
OPERATOR = "gpu-farm"
#: Its worker's name: an operator's workers go by ``<operator>/<hostname>``.
WORKER = f"{OPERATOR}/llama@test"
#: Generous: the first page load starts Chromium's renderer on a busy machine.
EXPECT_MS = 30_000


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium found: install Debian's chromium and chromium-driver packages "
                "(`make test` does, where it runs as root with apt-get) to run the browser tests")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (it comes with `pip install -e '.[test]'`)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def as_operator(db_url: str, tmp: Path) -> dict[str, str]:
    """Register ``OPERATOR`` with a new key and run the stack's worker for it; the gateway opens to ``ADMIN_KEY``."""
    key, key_file = Ed25519PrivateKey.generate(), tmp / "operator.key"
    signing.write_private(key_file, key)
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions.begin() as s:
        operators.register(s, OPERATOR, key.public_key())
    sessions.kw["bind"].dispose()
    return {"LLAMAS_OPERATOR": OPERATOR, "LLAMAS_OPERATOR_KEY": str(key_file), "LLAMAS_ADMIN_KEY": ADMIN_KEY}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[tuple[Stack, str]]:
    for stack in running_stack("sqlite", tmp_path_factory, prepare=as_operator):
        yield stack, stack.gateway_url()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("LLAMAS_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def page_at(browser: Any, base: str, path: str) -> Any:
    """A new page (its own cookies) that may reach the gateway and nothing else."""
    context = browser.new_context(viewport={"width": 1360, "height": 1000})
    offline: list[str] = []

    def only_the_gateway(route: Any) -> None:
        if route.request.url.startswith(base):
            route.continue_()
        else:
            offline.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_gateway)
    page = context.new_page()
    page.offline_requests = offline
    page.goto(base + path)
    return page


def sign_in(page: Any, key: str) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#sign-in-form")).to_be_visible(timeout=EXPECT_MS)
    page.fill("#key", key)
    page.click("#sign-in-form button[type=submit]")
    expect(page.locator("#role")).not_to_be_empty(timeout=EXPECT_MS)


def job_state(page: Any, job_id: str) -> Any:
    return page.locator(f'#jobs tr[data-job="{job_id}"] td.state')


def test_operator_and_requesters_watch_jobs_live_and_a_dead_worker_is_marked(
        live: tuple[Stack, str], browser: Any, shots: Path) -> None:
    from playwright.sync_api import expect

    stack, base = live
    alice_key, alice = stack.account(1_000_000)
    bob_key, bob = stack.account(1_000_000)

    admin = page_at(browser, base, "/dashboard")
    sign_in(admin, ADMIN_KEY)
    expect(admin.locator("#role")).to_have_text("admin")
    worker = admin.locator(f'#herd tr[data-worker="{WORKER}"] td.worker-state')
    expect(worker).to_have_text("alive", timeout=EXPECT_MS)
    # Its signed heartbeat proves whose worker it is.
    expect(admin.locator(f'#herd tr[data-worker="{WORKER}"] td.operator')).to_have_text(OPERATOR)
    # Set once: a page that reloads loses it.
    admin.evaluate("window.loadedOnce = true")

    # A job that holds the only slot, then bids behind it: the fee market fills.
    blocker = stack.occupy(alice)
    queued = [alice.run("Say one word.", tokens=8, multiplier=m) for m in (1.0, 1.5, 1.5, 3.0)]
    for handle in queued:
        expect(job_state(admin, handle.id)).to_have_text("queued", timeout=EXPECT_MS)
    expect(admin.locator("#kpi-queued .value")).to_have_text("4", timeout=EXPECT_MS)
    expect(admin.locator("#kpi-books .value")).to_have_text("balanced", timeout=EXPECT_MS)
    expect(job_state(admin, blocker.id)).to_have_text("running", timeout=EXPECT_MS)

    # Requesters, each in their own browser context: alice sees hers, bob none of them.
    mine = page_at(browser, base, "/dashboard")
    sign_in(mine, alice_key)
    expect(mine.locator("#role")).to_contain_text("requester")
    expect(job_state(mine, queued[-1].id)).to_have_text("queued", timeout=EXPECT_MS)
    expect(mine.locator("#herd")).to_be_hidden()
    bob_job = bob.run("Say one word.", tokens=8, multiplier=2.0)
    theirs = page_at(browser, base, "/dashboard")
    sign_in(theirs, bob_key)
    expect(job_state(theirs, bob_job.id)).to_have_count(1, timeout=EXPECT_MS)
    for handle in [blocker, *queued]:
        expect(job_state(theirs, handle.id)).to_have_count(0)
    expect(theirs.locator("#jobs tbody tr[data-job]")).to_have_count(1)
    expect(theirs.locator("#operators")).to_be_hidden()
    admin.screenshot(path=str(shots / "dashboard-admin.png"), full_page=True)
    theirs.screenshot(path=str(shots / "dashboard-requester.png"), full_page=True)

    # The blocker ends; every job runs and finishes on the open pages, without a reload.
    stack.release(blocker)
    for handle in [*queued, bob_job]:
        assert handle.result(timeout=120)["status"] == "done"
    for handle in queued:
        expect(job_state(admin, handle.id)).to_have_text("done", timeout=EXPECT_MS)
        expect(job_state(mine, handle.id)).to_have_text("done", timeout=EXPECT_MS)
    expect(job_state(theirs, bob_job.id)).to_have_text("done", timeout=EXPECT_MS)
    expect(admin.locator("#kpi-queued .value")).to_have_text("0", timeout=EXPECT_MS)
    assert admin.evaluate("window.loadedOnce") is True
    # Every job ran on the operator's worker: its share of the charges shows, as the ledger has it.
    with stack.sessions.begin() as s:
        earned = operators.earnings(s, OPERATOR)
    assert earned["jobs"] == 6 and earned["earned"] > 0
    farm = admin.locator("#operators tbody tr").first
    expect(farm.locator("td").nth(2)).to_have_text(f"{earned['earned']:,}", timeout=EXPECT_MS)

    # A worker killed outright stops beating: the admin's page marks it dead.
    os.kill(stack.worker.proc.pid, signal.SIGKILL)
    expect(worker).to_have_text("dead", timeout=EXPECT_MS)
    expect(admin.locator(f'#herd tr[data-worker="{WORKER}"]')).to_have_class("dead")
    admin.screenshot(path=str(shots / "dashboard-dead-worker.png"), full_page=True)
    assert admin.evaluate("window.loadedOnce") is True
    stack.replace_worker()
    expect(worker).to_have_text("alive", timeout=EXPECT_MS)

    for page in (admin, mine, theirs):
        assert page.offline_requests == []


def test_a_wrong_key_is_refused_on_the_page(live: tuple[Stack, str], browser: Any) -> None:
    from playwright.sync_api import expect

    _, base = live
    page = page_at(browser, base, "/dashboard")
    expect(page.locator("#sign-in-form")).to_be_visible(timeout=EXPECT_MS)
    page.fill("#key", "llm_wrong")
    page.click("#sign-in-form button[type=submit]")
    expect(page.locator("#sign-in-error")).to_contain_text("no such account", timeout=EXPECT_MS)
    expect(page.locator("#view")).to_be_hidden()


def test_the_api_docs_render_offline(live: tuple[Stack, str], browser: Any, shots: Path) -> None:
    from playwright.sync_api import expect

    _, base = live
    page = page_at(browser, base, "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("llamas", timeout=EXPECT_MS)
    expect(page.locator(".opblock-summary-path", has_text="/v1/chat/completions")).to_have_count(1)
    assert page.offline_requests == []
    page.screenshot(path=str(shots / "docs.png"))


def test_a_requester_cannot_read_another_accounts_job_through_the_dashboard(live: tuple[Stack, str]) -> None:
    import httpx

    stack, base = live
    alice_key, alice = stack.account(100_000)
    bob_key, _ = stack.account(100_000)
    job = alice.run("Say one word.", tokens=4)
    job.result(timeout=120)
    with httpx.Client(base_url=base, timeout=30) as http:
        assert http.post("/dashboard/session", json={"key": bob_key}).status_code == 200
        snap = http.get("/dashboard/snapshot").json()
    assert snap["role"] == "requester" and job.id not in str(snap)
