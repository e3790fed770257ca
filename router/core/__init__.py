"""The herder's core: money and jobs as plain functions over a SQL session.

Fees, the ledger, admission, the fee-market queue, dispatch, settlement,
forwarding, operators, receipts and the views of jobs, wired together by
``HerderService`` from injected parts. Nothing here starts a process, speaks
HTTP or builds a Celery app; everything else in ``router`` builds on it.
"""
