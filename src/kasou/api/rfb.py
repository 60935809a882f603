"""The client half of RFB (RFC 6143, with the extensions noVNC and QEMU use), framed message by message,
so the console proxy can keep what a console's policy forbids from reaching the VM.

Only the client-to-server direction is parsed: it carries small messages (keys, pointer, update
requests) and is cheap to frame. What it filters when the clipboard is off:

* ``ClientCutText`` (type 6, also in its extended form): dropped, so nothing on the endpoint's
  clipboard is pasted into the VM;
* the Extended Clipboard pseudo-encoding (``0xC0A1E5CE``) is taken out of ``SetEncodings``, so the
  server is never told the client could take clipboard data.

A message type it cannot frame ends the console (fail closed), rather than pass bytes it did not read.
The handshake is passed through as it comes: the version (12 bytes), the security type the client
picks (RFB 3.7/3.8; with 3.3 the server picks and the client sends nothing), the 16-byte answer of
VNC authentication, then ClientInit (1 byte). Security types with more client data (VeNCrypt,
TLS, ...) are refused: kasou's QEMU displays use none (they are unix sockets on the host).
"""

from __future__ import annotations

import struct

EXTENDED_CLIPBOARD = 0xC0A1E5CE  # the Extended Clipboard pseudo-encoding (as an unsigned 32-bit number)
SECURITY_NONE, SECURITY_VNC = 1, 2
MAX_CUT_TEXT = 16 * 1024 * 1024  # a longer ClientCutText is refused outright (it would be buffered whole)
MAX_FENCE = 64

# Fixed-length client messages: type -> total length.
_FIXED = {
    0: 20,  # SetPixelFormat
    3: 10,  # FramebufferUpdateRequest
    4: 8,  # KeyEvent
    5: 6,  # PointerEvent
    150: 10,  # EnableContinuousUpdates
    250: 4,  # xvp (noVNC's power buttons; QEMU does not offer it)
}


class RfbProtocolError(Exception):
    """The client sent something the proxy cannot frame: the console is closed."""


class ClientFilter:
    """Feed it the client's bytes as they come; it returns what may go on to the VM's display."""

    def __init__(self, clipboard: bool = False) -> None:
        self.clipboard = clipboard
        self._buf = bytearray()
        self._stage = "version"  # version, security, vnc-auth, init, messages
        self._v33 = False
        self.dropped_cut_text = 0  # ClientCutText messages kept from the VM
        self.dropped_bytes = 0

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        while True:
            n = self._next()
            if n is None:
                break
            msg = bytes(self._buf[:n])
            del self._buf[:n]
            out += self._pass(msg)
        return bytes(out)

    # -- framing -------------------------------------------------------------------------

    def _next(self) -> int | None:
        """The length of the next whole message in the buffer; None if it is not all here yet."""
        b = self._buf
        if not b:
            return None
        if self._stage == "version":
            return 12 if len(b) >= 12 else None
        if self._stage == "security":
            return 1
        if self._stage == "vnc-auth":
            return 16 if len(b) >= 16 else None
        if self._stage == "init":
            return 1
        kind = b[0]
        if kind in _FIXED:
            n = _FIXED[kind]
            return n if len(b) >= n else None
        if kind == 2:  # SetEncodings: type, pad, u16 count, count x s32
            if len(b) < 4:
                return None
            n = 4 + 4 * struct.unpack_from(">H", b, 2)[0]
            return n if len(b) >= n else None
        if kind == 6:  # ClientCutText: type, 3 pad, s32 length (negative: extended), text
            if len(b) < 8:
                return None
            length = abs(struct.unpack_from(">i", b, 4)[0])
            if length > MAX_CUT_TEXT:
                raise RfbProtocolError(f"a clipboard message of {length} bytes is too long")
            n = 8 + length
            return n if len(b) >= n else None
        if kind == 248:  # ClientFence: type, 3 pad, u32 flags, u8 length, payload
            if len(b) < 9:
                return None
            if b[8] > MAX_FENCE:
                raise RfbProtocolError("a fence message longer than 64 bytes")
            n = 9 + b[8]
            return n if len(b) >= n else None
        if kind == 251:  # SetDesktopSize: type, pad, u16 w, u16 h, u8 screens, pad, screens x 16
            if len(b) < 8:
                return None
            n = 8 + 16 * b[6]
            return n if len(b) >= n else None
        if kind == 255:  # QEMU's client messages: a sub-type
            if len(b) < 2:
                return None
            if b[1] == 0:  # extended key event
                n = 12
            elif b[1] == 1:  # audio: u16 operation; 0 enable, 1 disable, 2 set format
                if len(b) < 4:
                    return None
                op = struct.unpack_from(">H", b, 2)[0]
                if op not in (0, 1, 2):
                    raise RfbProtocolError(f"unknown QEMU audio operation {op}")
                n = 10 if op == 2 else 4
            else:
                raise RfbProtocolError(f"unknown QEMU client message {b[1]}")
            return n if len(b) >= n else None
        raise RfbProtocolError(f"unknown RFB client message type {kind}")

    def _pass(self, msg: bytes) -> bytes:
        """What of one whole message goes on (and the handshake stage that follows it)."""
        if self._stage == "version":
            if not msg.startswith(b"RFB ") or msg[-1:] != b"\n":
                raise RfbProtocolError("not an RFB client")
            self._v33 = msg[4:11] == b"003.003"
            self._stage = "init" if self._v33 else "security"
            return msg
        if self._stage == "security":
            if msg[0] == SECURITY_NONE:
                self._stage = "init"
            elif msg[0] == SECURITY_VNC:
                self._stage = "vnc-auth"
            else:
                raise RfbProtocolError(f"security type {msg[0]} is not offered by kasou's consoles")
            return msg
        if self._stage == "vnc-auth":
            self._stage = "init"
            return msg
        if self._stage == "init":
            self._stage = "messages"
            return msg
        if msg[0] == 6 and not self.clipboard:
            self.dropped_cut_text += 1
            self.dropped_bytes += len(msg)
            return b""
        if msg[0] == 2 and not self.clipboard:
            count = struct.unpack_from(">H", msg, 2)[0]
            encs = [e for e in struct.unpack_from(f">{count}I", msg, 4) if e != EXTENDED_CLIPBOARD]
            return struct.pack(f">BxH{len(encs)}I", 2, len(encs), *encs)
        return msg
