"""Reading a Parquet manifest with pyarrow: its column names, then chosen columns as text, a batch at a time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Any

from ..errors import ManifestError

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError as exc:  # an optional extra: only a Parquet manifest needs it
    raise ManifestError(
        "reading a Parquet manifest needs pyarrow: pip install 'backfill[parquet]' (or give the manifest as CSV "
        "or JSON lines)"
    ) from exc

# A value is sent exactly as written, so only text columns can hold one: an integer column has already lost the
# zeros of `00123`, and a timestamp column the way the partner wrote the date (its zone, its precision).
_FIX = {
    "user_id": "write the ids as text (a string column), as the source system holds them",
    "user_created_at": "write the dates as ISO 8601 text (a string column), e.g. 2021-05-18T15:14:43Z: in "
    "pandas df[col].dt.strftime('%Y-%m-%dT%H:%M:%S%z'), in SQL a cast to VARCHAR",
    "image_path": "write the paths as text (a string column)",
}


class ParquetManifest:
    """One Parquet file, read through `stream` (seekable, bounded to the snapshot): schema first, rows in batches."""

    def __init__(self, stream: IO[bytes], name: str) -> None:
        self._name = name
        try:
            # pre_buffer (for object stores' latency) keeps every column chunk read so far: 90 MB more at 10M
            # rows, measured. The stream is a local snapshot, so reading as each batch needs it costs nothing.
            self._file = pq.ParquetFile(stream, pre_buffer=False)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ManifestError(
                f"{name} can't be read as Parquet ({exc}): check that it is a whole .parquet file, or name the "
                "format it is in with --manifest-format csv or jsonl"
            ) from exc
        self.header: list[str] = list(self._file.schema_arrow.names)
        self.total_rows: int = self._file.metadata.num_rows

    def require_text(self, columns: dict[str, str]) -> None:
        """ManifestError unless each {role: column} named is a text column (nulls are fine: empty values)."""
        schema = self._file.schema_arrow
        for role, column in columns.items():
            kind = schema.field(column).type
            if _is_text(kind):
                continue
            example = " (an id like 00123 can't be held by one)" if pa.types.is_integer(kind) else ""
            raise ManifestError(
                f"{self._name}: column {column!r} ({role}) is of type {kind}, not text{example}; every value is "
                f"sent exactly as written. Fix: {_FIX[role]}"
            )

    def chunks(self, columns: list[str], chunk_rows: int) -> Iterator[list[list[str]]]:
        """The values of `columns`, as text with null as "", `chunk_rows` rows at a time (one list per column)."""
        try:
            for batch in self._file.iter_batches(batch_size=chunk_rows, columns=columns, use_threads=False):
                yield [_texts(batch.column(i)) for i in range(len(columns))]
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"{self._name} can't be read as Parquet past its schema ({exc})") from exc


def _is_text(kind: Any) -> bool:
    if pa.types.is_dictionary(kind):
        return _is_text(kind.value_type)
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind))


def _texts(column: Any) -> list[str]:
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return ["" if value is None else value for value in column.to_pylist()]
