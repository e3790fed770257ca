"""The herder's own routes for requesters: ``/info``, and one job's state, receipt or cancellation.

``GET /jobs/{id}`` is its state, ``GET /jobs/{id}/receipt`` its signed receipt once it has ended
(409 before), ``DELETE /jobs/{id}`` cancels it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from router.gateway.deps import ApiKey, Service

router = APIRouter()


@router.get("/info")
async def info(svc: Service) -> dict[str, Any]:
    return await run_in_threadpool(svc.info)


@router.get("/jobs/{job_id}")
async def job(job_id: str, svc: Service, key: ApiKey) -> dict[str, Any]:
    return await run_in_threadpool(svc.status, key, job_id)


@router.get("/jobs/{job_id}/receipt")
async def receipt(job_id: str, svc: Service, key: ApiKey) -> dict[str, Any]:
    return await run_in_threadpool(svc.receipt, key, job_id)


@router.delete("/jobs/{job_id}")
async def cancel(job_id: str, svc: Service, key: ApiKey) -> dict[str, Any]:
    return await run_in_threadpool(svc.cancel, key, job_id)
