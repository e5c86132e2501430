"""The ring's wire protocol: versioned, typed ZeroMQ multipart messages.

Data ring (PUSH -> PULL, as prima.cpp): every device binds one PULL socket and PUSHes to the device that runs
the next window (or to the head after the last window). PUSH/PULL fits because the ring is a one-way
pipeline with one token in flight: no replies are needed on the data path, messages between a pair stay in
order, and a PUSH to a peer that is not up yet is queued until it connects, so start-up order does not
matter. Liveness, errors and measurements travel on a separate control channel (every worker PUSHes
:class:`Status` messages to the head's control PULL socket), so a slow window never looks like a dead one.

A ring message has one to three frames:

1. ``MAGIC`` + a JSON :class:`Header`: protocol version, type, plan fingerprint, sequence number, step
   (token index), the window the receiver must run, number of tokens, payload shape and dtype, sender.
2. (``data`` only) positions: ``n_tokens`` little-endian int32 (absolute positions in sequence 0).
3. (``data`` with ``rows``) the sequence id of every row: ``n_tokens`` little-endian int32; positions are then
   consecutive within each sequence, not across the batch (several sequences in one batch: prima-sim serve).
4. (``data`` only) the hidden states: ``shape[0] * shape[1]`` little-endian float32, row-major.

:func:`decode` checks everything a receiver relies on and raises :class:`WireError` otherwise; receivers log
the reason, count the message as rejected, and go on (a malformed or foreign message never kills a worker).
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal

import numpy as np
from pydantic import Field, ValidationError

from prima_sim.exec.ring import WorkerState
from prima_sim.schema import FrozenModel

MAGIC = b"PRSM"
WIRE_VERSION: Final = 2
"""2: a status message carries the worker's state as a tagged union (was a bare string and a detail string)."""
MAX_HEADER_BYTES = 4096
DTYPE: Final = "f32"

MsgType = Literal["hello", "data", "stop"]


class WireError(ValueError):
    """A received message is malformed, of another protocol version, or for another plan."""


class Header(FrozenModel):
    """First frame of every ring message."""

    v: Literal[2] = WIRE_VERSION
    type: MsgType
    fp: str = Field(min_length=1, description="plan fingerprint")
    seq: int = Field(ge=0, description="head's message counter; every hop of one batch carries the same seq")
    step: int = Field(default=0, ge=0, description="token index of the metrics (0 = prefill)")
    window: int = Field(default=0, ge=0, description="index (execution order) of the window to run next")
    n_tokens: int = Field(default=0, ge=0)
    shape: tuple[int, int] = (0, 0)
    dtype: Literal["f32"] = DTYPE
    origin: str = ""
    t_step: float = Field(default=0.0, description="wall time the head started this step (for receive-wait)")
    rows: bool = Field(
        default=False, description="a sequence-id frame follows the positions (several sequences)"
    )


class Status(FrozenModel):
    """A worker's heartbeat on the control channel: its state (a tagged union on ``state.name``: idle, loading,
    ready, running, failed, each with its own fields; a failed state carries the error), new measurements."""

    v: Literal[2] = WIRE_VERSION
    type: Literal["status", "bye"]
    device: str
    pid: int
    fp: str
    state: WorkerState
    rejected: int = 0
    n_batch: int = Field(default=0, ge=0, description="largest batch the worker accepts")
    n_seq: int = Field(default=1, ge=1, description="sequences each of its windows' KV caches holds")
    spans: tuple[tuple[str, float, float, int, str], ...] = ()


def encode(
    header: Header, positions: np.ndarray | None = None, hidden: np.ndarray | None = None,
    seqs: np.ndarray | None = None,
) -> list[Any]:  # fmt: skip
    """Frames of one ring message (``positions`` and ``hidden`` only for ``data``; ``seqs`` with ``rows``)."""
    frames: list[Any] = [MAGIC + header.model_dump_json().encode()]
    if header.type == "data":
        assert positions is not None and hidden is not None
        frames.append(np.ascontiguousarray(positions, dtype="<i4"))
        if header.rows:
            assert seqs is not None
            frames.append(np.ascontiguousarray(seqs, dtype="<i4"))
        frames.append(np.ascontiguousarray(hidden, dtype="<f4"))
    return frames


def decode(
    frames: list[Any], fingerprint: str, n_embd: int
) -> tuple[Header, np.ndarray | None, np.ndarray | None]:
    """Parse and check one ring message (:func:`decode_rows` without the sequence ids)."""
    h, positions, _, hidden = decode_rows(frames, fingerprint, n_embd)
    return h, positions, hidden


def decode_rows(
    frames: list[Any], fingerprint: str, n_embd: int
) -> tuple[Header, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Parse and check one ring message.

    Args:
        frames: the multipart message (bytes or zmq frames).
        fingerprint: the receiver's plan fingerprint.
        n_embd: width of the hidden states this receiver expects.

    Returns:
        (header, positions, seqs, hidden); positions and hidden are None unless the type is ``data``, seqs
        unless the header has ``rows``.

    Raises:
        WireError: the message is malformed or foreign; the text says how.
    """
    if not frames:
        raise WireError("empty message")
    first = bytes(memoryview(frames[0]))
    if not first.startswith(MAGIC):
        raise WireError(f"not a prima-sim message (starts with {first[:8]!r})")
    if len(first) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(first)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        h = Header.model_validate_json(first[len(MAGIC) :])  # parsed and checked in one pass (pydantic-core)
    except ValidationError as exc:
        raise WireError(f"bad header {_reason(exc, first[len(MAGIC) :])}") from None
    if h.fp != fingerprint:
        raise WireError(f"message for plan {h.fp}, this worker runs plan {fingerprint}")
    if h.type != "data":
        if len(frames) != 1:
            raise WireError(f"'{h.type}' message with {len(frames)} frames, expected 1")
        return h, None, None, None
    want = 4 if h.rows else 3
    if len(frames) != want:
        raise WireError(f"data message with {len(frames)} frames, expected {want}")
    n, width = h.shape
    if n != h.n_tokens or n <= 0 or width != n_embd:
        raise WireError(
            f"shape {list(h.shape)} with n_tokens {h.n_tokens}; expected [n_tokens >= 1, {n_embd}]"
        )
    pos_buf, hid_buf = memoryview(frames[1]), memoryview(frames[-1])
    if pos_buf.nbytes != 4 * n:
        raise WireError(f"positions frame has {pos_buf.nbytes} bytes, expected {4 * n}")
    if hid_buf.nbytes != 4 * n * width:
        raise WireError(
            f"payload has {hid_buf.nbytes} bytes, expected {4 * n * width} for shape {list(h.shape)}"
        )
    positions = np.frombuffer(pos_buf, dtype="<i4")
    seqs = None
    if h.rows:
        seq_buf = memoryview(frames[2])
        if seq_buf.nbytes != 4 * n:
            raise WireError(f"sequence-id frame has {seq_buf.nbytes} bytes, expected {4 * n}")
        seqs = np.frombuffer(seq_buf, dtype="<i4")
        if int(seqs.min()) < 0:
            raise WireError(f"negative sequence id {int(seqs.min())}")
        for sq in np.unique(seqs):
            p = positions[seqs == sq]
            if len(p) > 1 and not np.array_equal(np.diff(p), np.ones(len(p) - 1, dtype=np.int32)):
                raise WireError(f"positions of sequence {int(sq)} are not consecutive")
    elif n > 1 and not np.array_equal(np.diff(positions), np.ones(n - 1, dtype=np.int32)):
        raise WireError("positions are not consecutive")
    if int(positions.min()) < 0:
        raise WireError(f"negative position {int(positions.min())}")
    hidden = np.frombuffer(hid_buf, dtype="<f4").reshape(n, width)
    return h, positions, seqs, hidden


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
        raise WireError(f"bad status {_reason(exc, raw[len(MAGIC) :])}") from None


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
