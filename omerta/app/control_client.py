"""
The command line's side of the control API: plain blocking HTTP over the
data directory's Unix socket (no reactor, so a command that a running node
answers takes milliseconds).

    client = ControlClient.for_data_dir(data_dir)   # None: no node serves it
    peers = client.get("/v1/peers")
    for kind, data in client.events(): ...

The socket is reached through the directory's descriptor
(C{/proc/self/fd/N/control.sock}), so a data directory whose path is longer
than a socket address can be works too.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlencode

CONTROL_SOCKET = "control.sock"
TIMEOUT = 120.0


class ControlError(Exception):
    """
    The node answered with an error; C{status} is the HTTP status and the
    message is the node's own (the text the command prints).
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class NoNode(Exception):
    """No node answers on the data directory's control socket."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, directory: Path, timeout: float):
        super().__init__("omerta", timeout=timeout)
        self.directory = directory

    def connect(self) -> None:
        fd = os.open(self.directory, os.O_PATH)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(f"/proc/self/fd/{fd}/{CONTROL_SOCKET}")
            except OSError:
                sock.close()
                raise
        finally:
            os.close(fd)
        self.sock = sock


class ControlClient:
    def __init__(self, data_dir: Path, timeout: float = TIMEOUT):
        self.data_dir = Path(data_dir)
        self.timeout = timeout

    @classmethod
    def for_data_dir(cls, data_dir: Path, timeout: float = TIMEOUT) -> ControlClient | None:
        """A client when a node serves C{data_dir}'s control socket, else None."""
        data_dir = Path(data_dir)
        if not (data_dir / CONTROL_SOCKET).exists():
            return None
        client = cls(data_dir, timeout)
        try:
            connection = _UnixConnection(data_dir, 2.0)
            connection.connect()
            connection.close()
        except OSError:
            return None
        return client

    def request(self, method: str, path: str, body: Any = None, query: dict | None = None,
                timeout: float | None = None) -> Any:
        """
        The decoded JSON document of a successful answer.

        @raise ControlError: the node said no (its message).
        @raise NoNode: nothing answers on the socket.
        """
        if query:
            path = f"{path}?{urlencode({k: v for k, v in query.items() if v is not None})}"
        connection = _UnixConnection(self.data_dir, self.timeout if timeout is None else timeout)
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except (ConnectionRefusedError, FileNotFoundError) as e:
            raise NoNode(str(e)) from None
        finally:
            connection.close()
        try:
            document = json.loads(raw) if raw else None
        except ValueError:
            raise ControlError(response.status,
                               f"the node answered {response.status} with no JSON") from None
        if response.status >= 400:
            message = document.get("error") if isinstance(document, dict) else None
            raise ControlError(response.status, message or f"the node answered {response.status}")
        return document

    def get(self, path: str, **query) -> Any:
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: dict, timeout: float | None = None) -> Any:
        return self.request("POST", path, body=body, timeout=timeout)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def events(self, kinds: list[str] | None = None,
               subscribed=None) -> Iterator[tuple[str, dict]]:
        """
        The node's event stream, as (kind, data) pairs, until the node goes
        away (keepalive comments are skipped).  C{subscribed()} is called
        once the node has subscribed the stream (no later event is missed).
        """
        query = f"?{urlencode({'kinds': ','.join(kinds)})}" if kinds else ""
        connection = _UnixConnection(self.data_dir, None)
        connection.request("GET", f"/v1/events{query}",
                           headers={"Accept": "text/event-stream"})
        response = connection.getresponse()
        if response.status >= 400:
            raw = response.read()
            try:
                message = json.loads(raw).get("error")
            except (ValueError, AttributeError):
                message = None
            raise ControlError(response.status, message or f"the node answered {response.status}")
        kind, data = "message", []
        try:
            for line in response:
                line = line.decode("utf-8", "replace").rstrip("\r\n")
                if not line:
                    if data:
                        yield kind, json.loads("\n".join(data))
                    kind, data = "message", []
                elif line.startswith(":"):
                    if subscribed is not None:
                        subscribed()
                        subscribed = None
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
        finally:
            connection.close()
