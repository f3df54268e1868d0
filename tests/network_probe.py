"""A build context whose ``RUN`` step records the network it ran on, and the record read back.

The test images are ``FROM scratch``, so the context carries a shell of its own: the host's
``/bin/dash`` with the libraries it loads (from ``ldd``). Its ``RUN`` step copies
``/proc/net/dev`` (the interfaces of the step's network namespace) and ``/proc/net/tcp``
(the TCP sockets there, listeners included) into the image; :func:`seen` reads them from the
built image. A step on the daemon host's network sees the host's listeners (Redis, the
registries); one on ``none`` sees a loopback of its own and nothing listening.
"""

from __future__ import annotations

import io
import re
import socket
import subprocess
import tarfile
from dataclasses import dataclass

SHELL = "/bin/dash"
_COPY = 'while read l; do echo "$l"; done'
RUN = f"{_COPY} < /proc/net/dev > /netdev && {_COPY} < /proc/net/tcp > /nettcp && {_COPY} < /proc/net/tcp6 >> /nettcp"


def _shell_files() -> dict[str, bytes]:
    """The shell and what it loads, at the paths it loads them from."""
    libraries = re.findall(r"(/\S+) \(0x", subprocess.run(["ldd", SHELL], capture_output=True, text=True, check=True).stdout)
    files = {"root/bin/sh": open(SHELL, "rb").read()}
    for path in libraries:
        files["root" + path] = open(path, "rb").read()
    return files


def context(nonce: str, run: str = RUN) -> bytes:
    """A build context (uncompressed tar) whose RUN step records its network (or runs ``run``
    in the shell). ``nonce`` keeps the daemon's build cache from answering for the step: the
    legacy builder's cache key does not include the network a step ran on."""
    files = {
        "Dockerfile": b"FROM scratch\nCOPY root/ /\nCOPY nonce /nonce\nRUN " + run.encode() + b"\n",
        "nonce": nonce.encode(),
        **_shell_files(),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@dataclass
class Seen:
    interfaces: set[str]
    listeners: set[tuple[str, int]]  # (address, port) of every listening TCP socket

    @property
    def listening_ports(self) -> set[int]:
        return {port for _, port in self.listeners}


def _read(api, container: str, path: str) -> str:
    stream, _ = api.get_archive(container, path)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        return tar.extractfile(path.rsplit("/", 1)[1]).read().decode()


def seen(api, image: str) -> Seen:
    """What the RUN step that built ``image`` saw (``api``: docker-py's APIClient)."""
    container = api.create_container(image, command=["/bin/sh", "-c", "exit 0"])["Id"]
    try:
        dev, tcp = _read(api, container, "/netdev"), _read(api, container, "/nettcp")
    finally:
        api.remove_container(container)
    return parse(dev, tcp)


def parse(dev: str, tcp: str) -> Seen:
    interfaces = {line.split(":", 1)[0].strip() for line in dev.splitlines()[2:] if ":" in line}
    listeners = set()
    for line in tcp.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
            address, port = fields[1].rsplit(":", 1)
            # IPv4 as the kernel prints it: 4 bytes, little-endian; IPv6: left as written
            ip = socket.inet_ntoa(bytes.fromhex(address)[::-1]) if len(address) == 8 else address
            listeners.add((ip, int(port, 16)))
    return Seen(interfaces, listeners)


def on_the_host(api, image: str) -> Seen:
    """The same probe run again in a container on the daemon host's network: what a step
    there would have seen (the control that shows the probe sees listeners where they are)."""
    container = api.create_container(image, command=["/bin/sh", "-c", RUN],
                                     host_config=api.create_host_config(network_mode="host"))["Id"]
    try:
        api.start(container)
        assert api.wait(container, timeout=60)["StatusCode"] == 0
        dev, tcp = _read(api, container, "/netdev"), _read(api, container, "/nettcp")
    finally:
        api.remove_container(container, force=True)
    return parse(dev, tcp)
