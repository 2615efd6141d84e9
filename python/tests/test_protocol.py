"""The codec against the Rust crate: the shared test vectors, both ways; the
generated dataclasses against the schema; hostile payloads."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from gpuctl import errors, messages
from gpuctl._core import Core
from gpuctl.codec import CODEC, DecodeError, from_json, to_json

VECTORS = sorted((ROOT / "protocol" / "tests" / "vectors").glob("*.json"))


def all_vectors() -> list:  # type: ignore[type-arg]
    return [
        pytest.param(vector, id=f"{path.stem}-{index}")
        for path in VECTORS
        for index, vector in enumerate(json.loads(path.read_text()))
    ]


def test_there_are_vectors() -> None:
    assert len(list(all_vectors())) >= 50


@pytest.mark.parametrize("vector", all_vectors())
def test_vector_decodes_to_its_message(vector) -> None:  # type: ignore[no-untyped-def]
    value = CODEC.decode(vector["type"], bytes.fromhex(vector["payload"]))
    assert to_json(vector["type"], value) == vector["message"]


@pytest.mark.parametrize("vector", all_vectors())
def test_vector_message_encodes_to_its_payload(vector) -> None:  # type: ignore[no-untyped-def]
    value = from_json(vector["type"], vector["message"])
    assert CODEC.encode(vector["type"], value).hex() == vector["payload"]


def test_generated_messages_match_the_schema() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "python" / "tools" / "generate_messages.py"), "--check"],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr


def test_every_error_code_has_its_exception_class() -> None:
    for code in messages.ErrorCode:
        raised = errors.from_wire(messages.Error(code, "why"))
        assert type(raised).__name__ == code.name
        assert isinstance(raised, errors.GpuctlError)
        assert raised.code == code and raised.message == "why"
    assert "(insufficient_vram)" in str(errors.from_wire(messages.Error(messages.ErrorCode.InsufficientVram, "x")))


@pytest.mark.parametrize(
    "payload, complaint",
    [
        ("", "needs 4 bytes"),
        ("09000000", "unknown variant 9"),
        ("01000000" "0100000000000000", "needs 4 bytes"),  # a Response without its response
        ("02000000" "0100000000000000" "00000000" "ffffffffffffff7f", "bytes claimed"),  # a huge string
        ("00000000" "01000400" "0500000000000000" "302e312e30" "0100000000000000" "1000000000000000" "ff", "bytes claimed"),
        ("00000000" "01000400" "0100000000000000" "ff", "invalid start byte"),
        ("01000000" "0100000000000000" "00000000" "00", "left over"),
    ],
)
def test_bad_payloads_are_refused_with_a_reason(payload: str, complaint: str) -> None:
    with pytest.raises(DecodeError, match=complaint):
        CODEC.decode("DaemonMessage", bytes.fromhex(payload))


def test_a_seq_count_beyond_the_payload_is_refused_before_any_loop() -> None:
    # Welcome whose capabilities claim 2^60 strings.
    payload = bytes.fromhex("00000000" "01000400" "0500000000000000" "302e312e30") + (1 << 60).to_bytes(8, "little")
    with pytest.raises(DecodeError, match="elements claimed"):
        CODEC.decode("DaemonMessage", payload)


def test_the_core_closes_on_a_frame_it_cannot_decode_and_fails_calls_in_flight() -> None:
    core = Core("test")
    welcome = CODEC.encode("DaemonMessage", messages.DaemonMessageWelcome(messages.Welcome(messages.ProtocolVersion(1, 4), "x", [])))
    core.data_received(len(welcome).to_bytes(4, "big") + welcome)
    call, frames = core.start(messages.RequestPing(messages.PingRequest()))
    list(frames)
    core.data_received(b"\x00\x00\x00\x02\xff\xff")
    assert isinstance(core.closed, errors.MalformedFrame)
    assert isinstance(call.error, errors.MalformedFrame)


def test_the_core_refuses_a_frame_over_its_limit_without_buffering_it() -> None:
    core = Core("test", max_frame=1024)
    core.data_received((1 << 30).to_bytes(4, "big"))
    assert isinstance(core.closed, errors.FrameTooLarge)


def test_frames_split_anywhere_decode_the_same() -> None:
    events = [
        messages.DaemonMessageEvent(1, messages.EventProgress(messages.ProgressEvent(i, 9, f"tile {i}", 5, None)))
        for i in range(9)
    ]
    stream = b""
    for event in events:
        payload = CODEC.encode("DaemonMessage", event)
        stream += len(payload).to_bytes(4, "big") + payload
    welcome = CODEC.encode("DaemonMessage", messages.DaemonMessageWelcome(messages.Welcome(messages.ProtocolVersion(1, 4), "x", [])))
    for step in (1, 3, 7, 64):
        core = Core("test")
        core.data_received(len(welcome).to_bytes(4, "big") + welcome)
        call, frames = core.start(messages.RequestPing(messages.PingRequest()))
        list(frames)
        for start in range(0, len(stream), step):
            core.data_received(stream[start : start + step])
        assert [e.value.done for e in call.events] == list(range(9))
