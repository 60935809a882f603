"""The console proxy's RFB client framing: clipboard data kept from the VM unless the policy allows it."""

from __future__ import annotations

import struct

import pytest

from kasou.api.rfb import EXTENDED_CLIPBOARD, ClientFilter, RfbProtocolError

HANDSHAKE = b"RFB 003.008\n" + b"\x01" + b"\x01"  # version, security None, ClientInit (shared)
KEY = struct.pack(">BBxxI", 4, 1, 0x61)  # 'a' down
POINTER = struct.pack(">BBHH", 5, 0, 10, 20)
UPDATE = struct.pack(">BBHHHH", 3, 1, 0, 0, 640, 480)


def cut(text: bytes) -> bytes:
    return struct.pack(">BxxxI", 6, len(text)) + text


def encodings(*encs: int) -> bytes:
    return struct.pack(f">BxH{len(encs)}I", 2, len(encs), *encs)


def test_handshake_and_ordinary_messages_pass_unchanged() -> None:
    f = ClientFilter()
    stream = HANDSHAKE + KEY + POINTER + UPDATE + struct.pack(">B3xIB2s", 248, 0, 2, b"ab")
    assert f.feed(stream) == stream


def test_clipboard_off_drops_client_cut_text_and_the_extended_clipboard_encoding() -> None:
    f = ClientFilter(clipboard=False)
    out = f.feed(HANDSHAKE + KEY + cut(b"patient 4711, secret") + encodings(0, 7, EXTENDED_CLIPBOARD, 0xFFFFFF21) + KEY)
    assert out == HANDSHAKE + KEY + encodings(0, 7, 0xFFFFFF21) + KEY
    assert b"patient" not in out
    assert f.dropped_cut_text == 1


def test_extended_cut_text_with_a_negative_length_is_dropped_too() -> None:
    f = ClientFilter()
    ext = struct.pack(">Bxxxi", 6, -8) + struct.pack(">I", 0x10) + b"abcd"
    assert f.feed(HANDSHAKE + ext + KEY) == HANDSHAKE + KEY


def test_clipboard_on_passes_everything() -> None:
    f = ClientFilter(clipboard=True)
    stream = HANDSHAKE + cut(b"ok to paste") + encodings(EXTENDED_CLIPBOARD)
    assert f.feed(stream) == stream


def test_messages_split_at_every_byte_are_framed_the_same() -> None:
    stream = HANDSHAKE + KEY + cut(b"secret text") + POINTER
    stream += struct.pack(">BBHII", 255, 0, 1, 0x61, 0x1E) + struct.pack(">BBHH", 255, 1, 2, 0) + b"\x00" * 6
    stream += struct.pack(">BxHHBx", 251, 800, 600, 1) + b"\x00" * 16
    whole = ClientFilter().feed(stream)
    f = ClientFilter()
    split = b"".join(f.feed(stream[i : i + 1]) for i in range(len(stream)))
    assert split == whole
    assert b"secret" not in split


def test_vnc_authentication_answer_is_framed() -> None:
    f = ClientFilter()
    stream = b"RFB 003.008\n" + b"\x02" + b"\x11" * 16 + b"\x01" + cut(b"x") + KEY
    assert f.feed(stream) == b"RFB 003.008\n" + b"\x02" + b"\x11" * 16 + b"\x01" + KEY


@pytest.mark.parametrize(
    "stream",
    [
        b"HTTP/1.1 200\n",  # not RFB
        b"RFB 003.008\n" + b"\x13",  # VeNCrypt: not offered
        HANDSHAKE + b"\x07" + b"\x00" * 16,  # an unknown message type
        HANDSHAKE + struct.pack(">BxxxI", 6, 1 << 30),  # a clipboard message too long to buffer
    ],
)
def test_what_cannot_be_framed_ends_the_console(stream: bytes) -> None:
    with pytest.raises(RfbProtocolError):
        ClientFilter().feed(stream)
