"""Bulk bytes between two processes over one authenticated connection (row 3 of the goals).

``python -m benchmarks.bulk_procs server KIND [--certs DIR]`` prints one JSON line with its
address and serves until its standard input closes; ``python -m benchmarks.bulk_procs client
KIND ADDR --size BYTES --count N [--certs DIR]`` moves ``count`` requests of ``size`` bytes
each way and prints one JSON line with the seconds of every request. KIND:

* ``mtor``: a ``Libp2pNetwork`` on each side; uploads are ``network.request`` calls carrying
  ``size`` bytes (the handler answers ``ok``), downloads are small requests whose handler
  returns ``size`` bytes; everything over the one connection the client dialled;
* ``tcp``: one plain TCP connection (blocking sockets, ``sendall`` / ``recv_into`` a
  preallocated buffer), the same request/response pattern: the speed of loopback in Python;
* ``tls``: the same over TLS 1.3 (Python's ``ssl``, OpenSSL), both ends authenticated by
  pinned self-signed ECDSA P-256 certificates, as peer IDs authenticate libp2p peers.

Each side is its own process: the harness starts the server, then the client.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import struct
import sys
import time
from pathlib import Path
from typing import Any

HEADER = struct.Struct(">cQ")  # op (U: upload, D: download, Q: quit), length
UP_PROTOCOL = "/mtor/bench/bulk-up/1"
DOWN_PROTOCOL = "/mtor/bench/bulk-down/1"


# -- certificates (tls) ----------------------------------------------------------------------


def make_certs(directory: Path) -> None:
    """A self-signed certificate and key for each side, in ``directory``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    for side in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bench-{side}")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256())
        )
        (directory / f"{side}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{side}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def tls_context(certs: Path, side: str) -> ssl.SSLContext:
    other = "client" if side == "server" else "server"
    purpose = ssl.PROTOCOL_TLS_SERVER if side == "server" else ssl.PROTOCOL_TLS_CLIENT
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(certs / f"{side}.pem", certs / f"{side}.key")
    context.load_verify_locations(certs / f"{other}.pem")  # the other side's pinned cert
    context.verify_mode = ssl.CERT_REQUIRED
    if side == "client":
        context.check_hostname = True
    return context


# -- sockets (tcp, tls) ----------------------------------------------------------------------


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def socket_server(kind: str, certs: Path | None) -> int:
    listener = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"addr": f"127.0.0.1:{listener.getsockname()[1]}"}), flush=True)
    payload = memoryview(os.urandom(1 << 20) * 64)  # 64 MiB, sliced to the asked length
    buffer = bytearray(len(payload))
    header = bytearray(HEADER.size)
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if kind == "tls":
        assert certs is not None
        conn = tls_context(certs, "server").wrap_socket(conn, server_side=True)
    with conn:
        while True:
            recv_exactly(conn, memoryview(header))
            op, length = HEADER.unpack(header)
            if op == b"Q":
                return 0
            if length > len(buffer):
                buffer = bytearray(length)
                payload = memoryview(os.urandom(length))
            if op == b"U":
                recv_exactly(conn, memoryview(buffer)[:length])
                conn.sendall(b"k")
            elif op == b"D":
                conn.sendall(payload[:length])


def socket_client(kind: str, addr: str, size: int, count: int, certs: Path | None) -> int:
    host, port = addr.rsplit(":", 1)
    start = time.perf_counter()
    conn = socket.create_connection((host, int(port)))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cipher = None
    if kind == "tls":
        assert certs is not None
        conn = tls_context(certs, "client").wrap_socket(conn, server_hostname="localhost")
        cipher = conn.cipher()
        assert conn.version() == "TLSv1.3"
    connect_s = time.perf_counter() - start
    payload = memoryview(os.urandom(size))
    buffer = bytearray(size)
    ack = bytearray(1)
    up, down = [], []
    with conn:
        # One small exchange each way first (as the mtor client does).
        conn.sendall(HEADER.pack(b"D", 1024))
        recv_exactly(conn, memoryview(buffer)[:1024])
        for _ in range(count):
            t = time.perf_counter()
            conn.sendall(HEADER.pack(b"U", size))
            conn.sendall(payload)
            recv_exactly(conn, memoryview(ack))
            up.append(time.perf_counter() - t)
        for _ in range(count):
            t = time.perf_counter()
            conn.sendall(HEADER.pack(b"D", size))
            recv_exactly(conn, memoryview(buffer))
            down.append(time.perf_counter() - t)
        conn.sendall(HEADER.pack(b"Q", 0))
    print(
        json.dumps(
            {"up_s": up, "down_s": down, "connect_s": connect_s, "cipher": cipher, "size": size}
        ),
        flush=True,
    )
    return 0


# -- mtor ------------------------------------------------------------------------------------


def _settings(size: int) -> Any:
    from mtor_p2p.libp2p_host import HostSettings

    # Room for one whole request of `size` bytes from the one peer.
    return HostSettings(
        max_pending_bytes_per_peer=2 * size + (1 << 20),
        max_pending_bytes_total=2 * size + (1 << 20),
    )


async def mtor_server(size: int) -> int:
    import trio

    from mtor_p2p.identity import Identity
    from mtor_p2p.libp2p_host import Libp2pNetwork

    payload = os.urandom(size)

    async def upload(sender: str, data: bytes) -> bytes:
        return b"ok"

    async def download(sender: str, data: bytes) -> bytes:
        wanted = int(data.decode())
        return payload if wanted == len(payload) else payload[:wanted]

    async with Libp2pNetwork.open(Identity.generate(), _settings(size)) as network:
        network.handle(UP_PROTOCOL, upload, max_request_bytes=size + 64, timeout=600)
        network.handle(DOWN_PROTOCOL, download, max_request_bytes=64, timeout=600)
        print(json.dumps({"addr": network.addrs()[0], "peer_id": network.peer_id}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the harness closes our stdin
    return 0


async def mtor_client(addr: str, size: int, count: int) -> int:
    from mtor_p2p.identity import Identity
    from mtor_p2p.libp2p_host import Libp2pNetwork

    payload = os.urandom(size)
    up, down = [], []
    async with Libp2pNetwork.open(Identity.generate(), _settings(size)) as network:
        start = time.perf_counter()
        peer = await network.connect(addr)
        connect_s = time.perf_counter() - start
        await network.request(peer, DOWN_PROTOCOL, b"1024", timeout=60)
        await network.request(peer, UP_PROTOCOL, payload[:1024], timeout=60)
        for _ in range(count):
            t = time.perf_counter()
            await network.request(peer, UP_PROTOCOL, payload, timeout=600)
            up.append(time.perf_counter() - t)
        for _ in range(count):
            t = time.perf_counter()
            body = await network.request(
                peer, DOWN_PROTOCOL, str(size).encode(), timeout=600, max_response_bytes=size + 64
            )
            down.append(time.perf_counter() - t)
            if len(body) != size:
                raise RuntimeError(f"downloaded {len(body)} bytes of {size}")
            del body
        connections = len(network.connected_peers())
    print(
        json.dumps(
            {"up_s": up, "down_s": down, "connect_s": connect_s, "size": size,
             "connected_peers": connections}
        ),
        flush=True,
    )  # fmt: skip
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bulk_procs")
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("kind", choices=["mtor", "tcp", "tls"])
    parser.add_argument("addr", nargs="?")
    parser.add_argument("--size", type=int, default=64 << 20)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--certs", type=Path)
    args = parser.parse_args(argv)
    if args.kind == "mtor":
        import logging

        import trio

        logging.getLogger("libp2p").setLevel(logging.CRITICAL)
        if args.role == "server":
            return trio.run(mtor_server, args.size)
        return trio.run(mtor_client, args.addr, args.size, args.count)
    if args.role == "server":
        return socket_server(args.kind, args.certs)
    return socket_client(args.kind, args.addr, args.size, args.count, args.certs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
