"""One decoder process of a pipeline's `DecoderPool` (`server/pipelines/decoders.py`): it
checks, decodes and letterboxes the encoded images the server writes to its socket, one at a
time, and writes back the pixels or the reason it could not.

It imports only what that takes (numpy, OpenCV, Pillow): no event loop, no gRPC, no metrics,
so a replacement starts fast.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import sys

import numpy as np

from server.child_process import die_with_parent
from server.errors import VolleyError
from server.pipelines.images import decode_image, letterbox
from server.sockets import read_exactly

# A job: detector height, width, padding value, pixel limit, then the sizes of `what` and data.
JOB = struct.Struct("<HHBQII")
# An answer: status, scale, pad_x, pad_y, original width and height, size of the error message.
ANSWER = struct.Struct("<BdiiiiI")
OK, INVALID, FAILED = 0, 1, 2


def serve(sock: socket.socket) -> None:
    """The decoder process: one job at a time until its socket closes (EOFError)."""
    while True:
        height, width, pad, max_pixels, label_size, data_size = JOB.unpack(
            read_exactly(sock, JOB.size)
        )
        what = read_exactly(sock, label_size).decode()
        data = read_exactly(sock, data_size)
        try:
            decoded = decode_image(data, what, max_pixels, fit=(height, width))
            boxed = letterbox(decoded.rgb, height, width, pad, (decoded.width, decoded.height))
        except VolleyError as exc:
            _answer_error(sock, INVALID, exc.message)
            continue
        except Exception as exc:  # noqa: BLE001 - any other failure is this image's 500
            _answer_error(sock, FAILED, f"{what}: {type(exc).__name__}: {exc}")
            continue
        answer = ANSWER.pack(OK, boxed.scale, boxed.pad_x, boxed.pad_y, boxed.width,
                             boxed.height, 0)  # fmt: skip
        sock.sendall(answer)
        sock.sendall(np.ascontiguousarray(boxed.pixels).data)


def _answer_error(sock: socket.socket, status: int, message: str) -> None:
    encoded = message.encode()
    sock.sendall(ANSWER.pack(status, 0.0, 0, 0, 0, 0, len(encoded)) + encoded)


def main() -> int:
    """Entry point: `python -m server.pipelines.decoder_process FD`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the server's to handle
    die_with_parent(signal.SIGKILL)
    sock = socket.socket(fileno=int(sys.argv[1]))
    with contextlib.suppress(EOFError, ConnectionError):  # the server is gone
        serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
