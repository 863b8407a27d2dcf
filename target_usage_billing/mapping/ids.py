"""Derived ids: the same record always gets the same idempotency key."""

from __future__ import annotations

import hashlib
import typing as t
import uuid
from collections.abc import Mapping, Sequence

import msgspec

# Namespace of derived ids (UUIDv5). Changing it would change every derived id: never do.
ID_NAMESPACE = uuid.UUID("6f1c7a52-3d0e-4b8e-9a51-2f1d0c7e9b44")
_canonical_encoder = msgspec.json.Encoder(decimal_format="number", order="sorted")


def derive_id(
    stream: str,
    record: Mapping[str, t.Any],
    key_properties: Sequence[str],
    mapping: str | int | None = None,
) -> str:
    """Deterministic UUIDv5 over the stream name and the key properties (or whole record).

    The same record always gets the same id, so a re-send after a crash or an overlapping
    backfill is de-duplicated by the billing platform. SDK metadata (_sdc_*) is ignored.
    A key property that is missing, null or empty cannot tell records apart (every such
    record would share one id and all but the first would be dropped as re-sends): then
    the whole record is the basis.

    ``mapping`` (a mapping's name or index) tells apart the ids of the several mappings
    that bill one record (mapping.fanout); None, the basis of every id before fan-out
    existed, stays byte-identical.
    """
    basis: t.Any = None
    if key_properties:
        basis = [record.get(key) for key in key_properties]
        if any(value is None or value == "" for value in basis):
            basis = None
    if basis is None:
        basis = {k: v for k, v in record.items() if not k.startswith("_sdc_")}
    hasher = hashlib.sha1(ID_NAMESPACE.bytes + stream.encode() + b"\x00")
    hasher.update(_canonical_encoder.encode(basis))  # no concatenated copy of a large record
    if mapping is not None:  # after the self-delimiting JSON: cannot collide with no mapping
        hasher.update(b"\x00" + _canonical_encoder.encode(mapping))
    # str(uuid.UUID(bytes=digest[:16], version=5)) written out: the same text in a third
    # of the time, which counts once per payload when mappings fan a record out
    digest = bytearray(hasher.digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
