"""The bodies the sandbox answers with, shaped like the contract's: results, error codes, fault statuses."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from ..api.signing import sign, utc_timestamp

_MESSAGES: Final = {
    "2201": "System error",
    "2203": "Invalid JSON",
    "2204": "Wrong data type",
    "2205": "You are not authorized to do that",
    "2207": "This user has been disabled",
    "2208": "This user has been deleted",
    "2209": "This user is already enrolled with user_id",
    "2211": "User must complete re-enrollment",
    "2213": "Missing parameter",
    "2220": "Production is not enabled for this partner",
    "2405": "You are not authorized to do that",
}
# Only 429 is a documented status; these follow the SDK test doubles (400 for the rest) plus the obvious ones.
_STATUS_FOR_CODE: Final = {"2201": 500, "2301": 500, "2401": 500, "2205": 401, "2405": 401}
_PASSED_ACTIONS: Final = {
    "Register_Selfie": "Approved",
    "Selfie_Check": "Passed",
    "Selfie_Provided": "Passed",
}
# Inference: the contract only documents the success answer; an unusable selfie plausibly fails these.
_UNUSABLE_ACTIONS: Final = {
    "Register_Selfie": "Rejected",
    "Selfie_Check": "Failed",
    "Selfie_Provided": "Passed",
}
_NOT_APPLICABLE: Final = (
    "Human_Review_Compare",
    "Human_Review_Liveness_Check",
    "Human_Review_Selfie_Check",
    "Human_Review_Update_Selfie",
    "Liveness_Check",
    "Return_Personal_Info",
    "Selfie_To_ID_Authority_Compare",
    "Selfie_To_ID_Card_Compare",
    "Selfie_To_Registered_Selfie_Compare",
    "Update_Registered_Selfie_On_File",
    "Verify_ID_Number",
)


def error_answer(code: str, message: str | None = None) -> web.Response:
    """An API error body, with the status the SDK test doubles use for that code."""
    body = {"code": code, "error": message or _MESSAGES.get(code, f"Error {code}")}
    return web.json_response(body, status=_STATUS_FOR_CODE.get(code, 400))


def fault_answer(status: int, retry_after: float) -> web.Response:
    """What an injected HTTP fault looks like: a 429 with Retry-After, a proxy's 502, or a system error."""
    if status == 429:
        headers = {"Retry-After": _seconds(retry_after)}
        return web.json_response({"code": "429", "error": "Too many requests"}, status=429, headers=headers)
    if status == 502:
        # What a proxy in front of the API sends: not JSON at all.
        return web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")
    return web.json_response({"code": "2201", "error": "System error"}, status=status)


def result_answer(
    *,
    partner_id: str,
    api_key: str,
    user_id: str,
    created: str,
    job_id: str,
    smile_job_id: str,
    unusable: bool,
) -> web.Response:
    """The signed job result: 0840 for an enrollment, 0001 for an unusable selfie."""
    timestamp = utc_timestamp()
    actions = dict.fromkeys(_NOT_APPLICABLE, "Not Applicable")
    actions.update(_UNUSABLE_ACTIONS if unusable else _PASSED_ACTIONS)
    body = {
        "Actions": dict(sorted(actions.items())),
        "ConfidenceValue": "0" if unusable else "99",
        "PartnerParams": {
            "job_type": 4,
            "user_id": user_id,
            "job_id": job_id,
            "user_created_at": created,
        },
        "ResultCode": "0001" if unusable else "0840",
        "ResultText": "Selfie image unusable" if unusable else "Enroll User",
        "Source": "Rest API",
        "SmileJobID": smile_job_id,
        "signature": sign(timestamp, partner_id, api_key),
        "timestamp": timestamp,
    }
    return web.json_response(body)


def _seconds(value: float) -> str:
    value = float(value)  # callers pass ints too (retry_after_s=2), and int.is_integer is 3.12+
    return str(int(value)) if value.is_integer() else f"{value:.3f}".rstrip("0")
