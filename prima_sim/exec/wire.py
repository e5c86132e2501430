"""The ring's wire protocol: versioned, typed ZeroMQ multipart messages.

Data ring (PUSH -> PULL, as prima.cpp): every device binds one PULL socket and PUSHes to the device that runs
the next window (or to the head after the last window). PUSH/PULL fits because the ring is a one-way
pipeline with one token in flight: no replies are needed on the data path, messages between a pair stay in
order, and a PUSH to a peer that is not up yet is queued until it connects, so start-up order does not
matter. Liveness, errors and measurements travel on a separate control channel (every worker PUSHes
:class:`Status` messages to the head's control PULL socket), so a slow window never looks like a dead one.

A ring message has one or two frames:

1. The header: ``MAGIC``, then a fixed little-endian binary struct (:data:`HEADER`: protocol version, type, flags,
   dtype, sequence number, step (token index), the window the receiver must run, number of tokens, row width,
   the head's step start time, plan fingerprint, length of the sender's name), the sender's name (UTF-8), and for
   ``data``: the positions (``n_tokens`` int32, absolute positions) and, with the ``rows`` flag, the sequence id
   of every row (``n_tokens`` int32; positions are then consecutive within each sequence, not across the batch:
   several sequences in one batch, prima-sim serve).
2. (``data`` only) the hidden states: ``n_tokens * width`` little-endian float32, row-major, sent straight from
   the window's output buffer (ZeroMQ sends it without a copy when it is large).

The header is read with one ``struct.unpack_from`` and a few integer checks, not parsed as JSON and validated field
by field on every hop (wire version 2 did: a per-hop pydantic model). :func:`decode` checks everything a receiver
relies on and raises :class:`WireError` otherwise; receivers log the reason, count the message as rejected, and go
on (a malformed or foreign message never kills a worker). A message of an older, JSON-header version (``MAGIC`` +
``{``) is answered with the version it speaks. Control messages (:class:`Status`, four a second per worker) stay
JSON, validated by pydantic.
"""

from __future__ import annotations

import array
import json
import struct
import sys
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

from pydantic import Field, ValidationError

from prima_sim.exec.ring import WorkerState
from prima_sim.schema import FrozenModel

if TYPE_CHECKING:  # arrays are made where the head asks for them: a worker imports no numpy (docs/exec.md)
    import numpy as np

MAGIC = b"PRSM"
WIRE_VERSION: Final = 3
"""3: a ring message's header is a fixed binary struct followed by the sender's name and the positions, and the
hidden states are the second of two frames (2: a JSON header validated by pydantic on every hop, positions in a
frame of their own). 2: a status message carries the worker's state as a tagged union (was a bare string and a
detail string)."""
HEADER: Final = struct.Struct("<4sBBBBQIIIId16sB")
"""magic, version, type, flags, dtype, seq, step, window, n_tokens, width, t_step, fingerprint (ASCII, NUL-padded),
length of the sender's name (followed by the name, then the positions and sequence ids)."""
MAX_HEADER_BYTES = HEADER.size + 255 + 8 * 8192
"""The name and the positions and sequence ids of a batch of up to 8192 tokens."""
DTYPE: Final = "f32"
FP_BYTES = 16

MsgType = Literal["hello", "data", "stop"]
_TYPE_CODE: Final = {"hello": 1, "data": 2, "stop": 3}
_CODE_TYPE: Final = {v: k for k, v in _TYPE_CODE.items()}
_DTYPE_F32 = 1
_FLAG_ROWS = 1
_JSON_OPEN = ord("{")  # a version <= 2 header (JSON) has this byte where version 3 has its version


class WireError(ValueError):
    """A received message is malformed, of another protocol version, or for another plan."""


class VersionError(WireError):
    """A status message of another protocol version: a peer running another prima-sim release.

    Attributes:
        version: the version it speaks.
        device: the device it names ("" when unknown).
    """

    def __init__(self, text: str, version: object, device: str) -> None:
        super().__init__(text)
        self.version, self.device = version, device


class Header(NamedTuple):
    """The header of every ring message (a plain tuple: built and read on every hop)."""

    type: MsgType
    fp: str
    """plan fingerprint (at most 16 ASCII characters)"""
    seq: int
    """head's message counter; every hop of one batch carries the same seq"""
    step: int = 0
    """token index of the metrics (0 = prefill)"""
    window: int = 0
    """index (execution order) of the window to run next"""
    n_tokens: int = 0
    shape: tuple[int, int] = (0, 0)
    """[n_tokens, width] of the hidden states (``data``)"""
    dtype: str = DTYPE
    origin: str = ""
    """the sender"""
    t_step: float = 0.0
    """wall time the head started this step (for receive-wait)"""
    rows: bool = False
    """sequence ids follow the positions (several sequences)"""


class Status(FrozenModel):
    """A worker's heartbeat on the control channel: its state (a tagged union on ``state.name``: idle, loading,
    ready, running, failed, each with its own fields; a failed state carries the error), new measurements."""

    v: Literal[3] = WIRE_VERSION
    type: Literal["status", "bye"]
    device: str
    pid: int
    fp: str
    state: WorkerState
    rejected: int = 0
    n_batch: int = Field(default=0, ge=0, description="largest batch the worker accepts")
    n_seq: int = Field(default=1, ge=1, description="sequences each of its windows' KV caches holds")
    spans: tuple[tuple[str, float, float, int, str], ...] = ()


def encode(header: Header, positions: Any = None, hidden: Any = None, seqs: Any = None) -> list[Any]:
    """Frames of one ring message (``positions`` and ``hidden`` only for ``data``; ``seqs`` with ``rows``).

    ``positions``, ``seqs`` and ``hidden`` are numpy arrays, or memoryviews of format ``i`` and ``f`` (a worker's:
    :func:`decode_rows` with ``arrays=False``). The hidden-state frame is ``hidden`` itself (contiguous
    little-endian float32, else a converted copy): send the frames with ``copy=False`` and it is not copied again.

    Raises:
        ValueError: a field does not fit the wire (a negative number, a fingerprint of more than 16 ASCII
            characters, a sender name of more than 255 bytes, a shape that is not [n_tokens, width]).
    """
    origin = header.origin.encode()
    data = header.type == "data"
    n, width = header.shape
    if data and n != header.n_tokens:
        raise ValueError(f"shape {list(header.shape)} with n_tokens {header.n_tokens}")
    try:
        head = HEADER.pack(
            MAGIC, WIRE_VERSION, _TYPE_CODE[header.type], _FLAG_ROWS if header.rows else 0, _DTYPE_F32,
            header.seq, header.step, header.window, header.n_tokens, width, header.t_step,
            header.fp.encode("ascii"), len(origin),
        )  # fmt: skip
    except (struct.error, KeyError, UnicodeEncodeError) as exc:
        raise ValueError(f"header {header} does not fit the wire: {exc}") from None
    if len(header.fp) > FP_BYTES or not header.fp:
        raise ValueError(f"fingerprint {header.fp!r} is not 1 to {FP_BYTES} ASCII characters")
    if not data:
        return [head + origin]
    assert positions is not None and hidden is not None
    parts = [head, origin, memoryview(_as(positions, "i")).tobytes()]
    if header.rows:
        assert seqs is not None
        parts.append(memoryview(_as(seqs, "i")).tobytes())
    return [b"".join(parts), _as(hidden, "f")]


_LITTLE = sys.byteorder == "little"


def _as(a: Any, code: str) -> Any:
    """``a`` itself when it already is contiguous little-endian 4-byte ``code`` (``i``: int32, ``f``: float32) items
    (the hot path: a numpy array of that dtype, or a memoryview of that format on a little-endian host), else a
    converted copy."""
    if isinstance(a, memoryview) and a.format == code and a.c_contiguous and _LITTLE:
        return a
    import numpy as np

    dt = np.dtype("<i4" if code == "i" else "<f4")
    return (
        a
        if isinstance(a, np.ndarray) and a.dtype == dt and a.flags.c_contiguous
        else np.ascontiguousarray(a, dtype=dt)
    )


def _items(buf: memoryview, code: Literal["i", "f"]) -> memoryview[Any]:
    """The little-endian 4-byte ``code`` items in the bytes ``buf``: a view of them (a copy on a big-endian host)."""
    if _LITTLE:
        return buf.cast("i") if code == "i" else buf.cast("f")
    a = array.array(code, buf.tobytes())
    a.byteswap()
    return memoryview(a)


def decode(
    frames: list[Any], fingerprint: str, n_embd: int
) -> tuple[Header, np.ndarray | None, np.ndarray | None]:
    """Parse and check one ring message (:func:`decode_rows` without the sequence ids)."""
    h, positions, _, hidden = decode_rows(frames, fingerprint, n_embd)
    return h, positions, hidden


def _old_version(body: bytes) -> str:
    """Why a JSON header (wire version 2 or older) is refused: the version it speaks, or that it is not JSON."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"bad header: a JSON header (wire version 2 or older) that is not JSON: {exc}"
    v = raw.get("v") if isinstance(raw, dict) else None
    return f"bad header: protocol version {v!r}, this side speaks {WIRE_VERSION}"


def decode_rows(
    frames: list[Any], fingerprint: str, n_embd: int, arrays: bool = True
) -> tuple[Header, Any, Any, Any]:
    """Parse and check one ring message.

    Args:
        frames: the multipart message (bytes or zmq frames).
        fingerprint: the receiver's plan fingerprint.
        n_embd: width of the hidden states this receiver expects.
        arrays: return numpy arrays (positions and seqs int32 [n], hidden float32 [n, width]); False: memoryviews
            (positions and seqs of format ``i``, hidden flat of format ``f``; a worker, which imports no numpy).

    Returns:
        (header, positions, seqs, hidden); positions and hidden are None unless the type is ``data``, seqs
        unless the header has ``rows``. They are views of the frames (no copy; on a big-endian host, copies).

    Raises:
        WireError: the message is malformed or foreign; the text says how.
    """
    if not frames:
        raise WireError("empty message")
    buf = memoryview(frames[0])
    size = buf.nbytes
    if size < 5 or buf[:4] != MAGIC:
        raise WireError(f"not a prima-sim message (starts with {bytes(buf[:8])!r})")
    if size > MAX_HEADER_BYTES:
        raise WireError(f"header of {size} bytes exceeds {MAX_HEADER_BYTES}")
    if buf[4] != WIRE_VERSION:
        if buf[4] == _JSON_OPEN:
            raise WireError(_old_version(bytes(buf[4:])))
        raise WireError(f"bad header: protocol version {buf[4]}, this side speaks {WIRE_VERSION}")
    if size < HEADER.size:
        raise WireError(f"header of {size} bytes is truncated (at least {HEADER.size})")
    _, _, code, flags, dt, seq, step, window, n, width, t_step, fp, n_origin = HEADER.unpack_from(buf)
    kind = _CODE_TYPE.get(code)
    if kind is None:
        raise WireError(f"bad header field type: unknown message type {code}")
    if flags & ~_FLAG_ROWS:
        raise WireError(f"bad header field flags: unknown flags {flags:#x}")
    if dt != _DTYPE_F32:
        raise WireError(f"bad header field dtype: unknown dtype {dt}")
    fp_s = fp.rstrip(b"\0").decode("ascii", "replace")
    if fp_s != fingerprint:
        raise WireError(f"message for plan {fp_s}, this worker runs plan {fingerprint}")
    end = HEADER.size + n_origin
    try:
        origin = str(buf[HEADER.size : end], "utf-8")
    except UnicodeDecodeError:
        raise WireError("bad header field origin: not UTF-8") from None
    rows = bool(flags & _FLAG_ROWS)
    h = Header(kind, fp_s, seq, step, window, n, (n, width), DTYPE, origin, t_step, rows)  # type: ignore[arg-type]
    if kind != "data":
        if len(frames) != 1:
            raise WireError(f"'{kind}' message with {len(frames)} frames, expected 1")
        if size != end:
            raise WireError(f"'{kind}' header of {size} bytes, expected {end}")
        return h, None, None, None
    if len(frames) != 2:
        raise WireError(f"data message with {len(frames)} frames, expected 2")
    if n <= 0 or width != n_embd:
        raise WireError(f"shape {[n, width]} with n_tokens {n}; expected [n_tokens >= 1, {n_embd}]")
    want = end + (8 if rows else 4) * n
    if size != want:
        raise WireError(f"positions: header of {size} bytes, expected {want} for {n} tokens")
    hid_buf = memoryview(frames[1])
    if hid_buf.nbytes != 4 * n * width:
        raise WireError(
            f"payload has {hid_buf.nbytes} bytes, expected {4 * n * width} for shape {[n, width]}"
        )
    positions = _items(buf[end : end + 4 * n], "i")
    hidden = _items(hid_buf.cast("B") if hid_buf.format != "B" else hid_buf, "f")
    seqs = _items(buf[end + 4 * n : end + 8 * n], "i") if rows else None
    if n == 1:  # one token (decoding): no sequence to check
        if positions[0] < 0:
            raise WireError(f"negative position {positions[0]}")
        if seqs is not None and seqs[0] < 0:
            raise WireError(f"negative sequence id {seqs[0]}")
    else:
        if seqs is not None:
            if min(seqs) < 0:
                raise WireError(f"negative sequence id {min(seqs)}")
            last: dict[int, int] = {}
            broken = set()
            for p, sq in zip(positions, seqs, strict=True):
                if sq in last and p != last[sq] + 1:
                    broken.add(sq)
                last[sq] = p
            if broken:
                raise WireError(f"positions of sequence {min(broken)} are not consecutive")
        elif any(positions[i + 1] != positions[i] + 1 for i in range(n - 1)):
            raise WireError("positions are not consecutive")
        if min(positions) < 0:
            raise WireError(f"negative position {min(positions)}")
    if not arrays:
        return h, positions, seqs, hidden
    import numpy as np

    return (
        h,
        np.frombuffer(positions, dtype=np.int32),
        None if seqs is None else np.frombuffer(seqs, dtype=np.int32),
        np.frombuffer(hidden, dtype=np.float32).reshape(n, width),
    )


def encode_status(status: Status) -> bytes:
    """The single frame of a control message."""
    return MAGIC + status.model_dump_json().encode()


def decode_status(frame: Any) -> Status:
    """Parse a control message.

    Raises:
        WireError: it is not a valid status message.
    """
    raw = bytes(memoryview(frame))
    if not raw.startswith(MAGIC):
        raise WireError(f"not a prima-sim control message (starts with {raw[:8]!r})")
    try:
        return Status.model_validate_json(raw[len(MAGIC) :])
    except ValidationError as exc:
        why = f"bad status {_reason(exc, raw[len(MAGIC) :])}"
        body = _json_object(raw[len(MAGIC) :])
        if body is not None and body.get("v") != WIRE_VERSION:
            raise VersionError(why, body.get("v"), str(body.get("device", ""))) from None
        raise WireError(why) from None


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def _reason(exc: ValidationError, body: bytes) -> str:
    """The one most useful reason a message body failed validation: not JSON, another protocol version, or
    the first invalid field (its dotted path; a union member's tag is part of it, as in ``state.running.step``)."""
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as jexc:
        return f"message: not JSON: {jexc}"
    if isinstance(raw, dict) and raw.get("v") != WIRE_VERSION:
        return f"message: protocol version {raw.get('v')!r}, this side speaks {WIRE_VERSION}"
    err = exc.errors(include_url=False)[0]
    return f"field {'.'.join(map(str, err['loc']))}: {err['msg']}"
