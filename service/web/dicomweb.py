"""DICOMweb in: STOW-RS, ``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study}`` (PS3.18 10.5).

Checks in order, each refusal audited before anything of the body is read: a registered client's
bearer token from one of its networks (401 / 403), the media type (415), the response type (406),
the declared size (413), free disk (503). Then the body is read as it arrives, and each instance
is validated and stored (written, fsynced, committed) by the C-STORE ingest path before the next
part is read; the response lists every instance, stored or failed with its reason.
"""

from __future__ import annotations

import asyncio
import logging
import re

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from service.dicomweb_clients import Refusal
from service.schema import AssociationOutcome
from service.stow import RESPONSE_TYPE, InstanceOutcome, PartStream, StowError, http_status, multipart_boundary, response
from service.stow_requests import StowRequest, StowRequests

LOG = logging.getLogger(__name__)
router = APIRouter(prefix="/dicomweb", tags=["DICOMweb"])
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_ACCEPTABLE = ("application/dicom+json", "application/json", "application/*", "*/*")


def _error(status: int, reason: str, outcomes: list[InstanceOutcome] | None = None) -> JSONResponse:
    body: dict[str, object] = {"error": reason}
    if outcomes:
        # Instances stored before the request went wrong stay stored (nothing is lost; a re-send is a duplicate).
        body["stored"] = [o.sop_instance_uid for o in outcomes if o.stored]
        body["failed"] = [o.sop_instance_uid for o in outcomes if not o.stored]
    headers = {"Connection": "close"} if status in (400, 408, 413) else {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="medcap-dicomweb"'
    return JSONResponse(body, status_code=status, headers=headers)


def _acceptable(accept: str | None) -> bool:
    if not accept:
        return True
    return any(item.split(";")[0].strip().lower() in _ACCEPTABLE for item in accept.split(","))


@router.post("/studies", summary="STOW-RS: store instances of any studies")
async def store_instances(request: Request) -> Response:
    return await _stow(request, None)


@router.post("/studies/{study_uid}", summary="STOW-RS: store instances of one study")
async def store_study_instances(request: Request, study_uid: str) -> Response:
    return await _stow(request, study_uid)


async def _stow(request: Request, study_uid: str | None) -> Response:
    stow: StowRequests = request.app.state.stow
    address, port = (request.client.host, request.client.port) if request.client else ("unknown", 0)
    route = f"POST {request.url.path}"
    auth = await run_in_threadpool(stow.authenticate, request.headers.get("authorization"), address)
    client = auth.client if isinstance(auth, Refusal) else auth.name
    try:
        if isinstance(auth, Refusal):
            raise StowError(auth.status, auth.reason)
        boundary = multipart_boundary(request.headers.get("content-type"))
        if not _acceptable(request.headers.get("accept")):
            raise StowError(406, f"cannot answer in {request.headers.get('accept')!r}: the response is {RESPONSE_TYPE}")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > stow.max_bytes):
            raise StowError(
                413, f"Content-Length {declared[:20]} is over the limit of {stow.max_bytes} bytes (MEDCAP_DICOMWEB_MAX_REQUEST_MB)"
            )
        if study_uid is not None and (len(study_uid) > 64 or not _UID.match(study_uid)):
            raise StowError(400, f"{study_uid[:80]!r} is not a Study Instance UID")
        if not await run_in_threadpool(stow.has_room):
            raise StowError(503, "free disk is below MEDCAP_MIN_FREE_DISK_MB: try again later")
        parts = PartStream(boundary, stow.max_bytes)
    except StowError as exc:
        await run_in_threadpool(stow.refused, client, address, port, route, exc.status, exc.reason)
        return _error(exc.status, exc.reason)
    tls = request.url.scheme == "https"
    held = await run_in_threadpool(stow.open, auth, address, port, tls, route, study_uid)
    return await _receive(request, stow, held, parts, study_uid)


async def _receive(request: Request, stow: StowRequests, held: StowRequest, parts: PartStream, study_uid: str | None) -> Response:
    outcomes: list[InstanceOutcome] = []
    chunks = request.stream().__aiter__()
    try:
        while True:
            try:
                # A sender that stalls would hold its studies open: the listener's idle timeout applies.
                chunk = await asyncio.wait_for(chunks.__anext__(), stow.idle_timeout)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise StowError(408, f"no data for {stow.idle_timeout:g} s (MEDCAP_DICOM_TIMEOUT_SECONDS)") from None
            for part in parts.feed(chunk):
                outcomes.append(await run_in_threadpool(stow.store, held, part, study_uid))
        for part in parts.finish():
            outcomes.append(await run_in_threadpool(stow.store, held, part, study_uid))
        status = http_status(outcomes)
    except StowError as exc:
        await run_in_threadpool(stow.close, held, AssociationOutcome.ABORTED, exc.status, exc.reason)
        return _error(exc.status, exc.reason, outcomes)
    except ClientDisconnect:
        await run_in_threadpool(stow.close, held, AssociationOutcome.ABORTED, None, "the client went away before the end of the request")
        return Response(status_code=400)  # nobody is listening
    except Exception:
        LOG.exception("STOW-RS request failed")
        await run_in_threadpool(stow.close, held, AssociationOutcome.ABORTED, 500, "internal error")
        raise
    await run_in_threadpool(stow.close, held, AssociationOutcome.RELEASED, status)
    return JSONResponse(response(outcomes), status_code=status, media_type=RESPONSE_TYPE)
