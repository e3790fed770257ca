"""The herder's own routes for requesters: ``/info``, and one job's state, receipt or cancellation.

``/info`` shows worker host names and the gateway's pid to the admin key
only; anyone else gets ``info.public``'s counts and prices.

``GET /jobs/{id}`` is its state, ``GET /jobs/{id}/receipt`` its signed receipt once it has ended
(409 before), ``DELETE /jobs/{id}`` cancels it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from router.core import info as info_doc
from router.gateway.deps import ApiKey, Service, is_admin_key

router = APIRouter()


@router.get("/info")
async def info(request: Request, svc: Service) -> dict[str, Any]:
    doc = await run_in_threadpool(svc.info)
    given = request.headers.get("authorization", "").partition(" ")[2].strip()
    return doc if is_admin_key(svc, given) else info_doc.public(doc)


@router.get("/jobs/{job_id}")
async def job(job_id: str, svc: Service, key: ApiKey) -> dict[str, Any]:
    return await run_in_threadpool(svc.status, key, job_id)


@router.get("/jobs/{job_id}/receipt")
async def receipt(job_id: str, svc: Service, key: ApiKey) -> dict[str, Any]:
    return await run_in_threadpool(svc.receipt, key, job_id)


@router.delete("/jobs/{job_id}")
async def cancel(job_id: str, svc: Service, key: ApiKey) -> dict[str, Any]:
    return await run_in_threadpool(svc.cancel, key, job_id)
