"""A dry run's stand-in for the sender: each photo read and its request built, nothing sent or recorded."""

from __future__ import annotations

from ..api.client import Client
from ..images import ImageError, ImageSource
from ..vocab import Status
from .plan import ToSend
from .send import RowEnd


class DryRun:
    """Same face as `Sender`: what `send` returns is what the row would have been told before a real send."""

    attempts = 0  # nothing is ever sent
    in_flight = 0

    def __init__(self, *, images: ImageSource, client: Client) -> None:
        self._images, self._client = images, client

    def abandon(self, reason: str) -> int:
        return 0  # nothing is ever on the wire

    async def send(self, row: ToSend) -> RowEnd:
        try:
            photo = await self._images.read(row.fingerprint)
        except ImageError as exc:
            return RowEnd(
                status=Status.REJECTED,
                reason=exc.problem.reason,
                message=f"at send time: {exc.problem.message}",
            )
        # Built and signed as it would be sent: a photo or setting that can't make a request fails here too.
        self._client.photo_body(row.user_id, row.user_created_at, photo.data)
        return RowEnd(status=Status.DRY_RUN, message="would be sent")
