"""
Tiny UDP probes that tests/test_natlab.py runs inside NAT lab namespaces
(C{ip netns exec NS python natlab_probe.py ...}).  Standard library only;
every message is one JSON object per datagram; every result is one JSON line
on stdout; a probe that misses its deadline exits 2 with a message.

    natlab_probe.py server --listen 198.51.100.10:3000 --listen ...
        Prints {"ready": [...]} once bound, then answers:
        {"op": "echo", "id": I}           -> {"id": I, "seen": "ip:port"}
        {"op": "send", "id": I, "from": ["ip:port", ...]}
            -> {"token": "ip:port"} from each listed socket to the sender's
               address as seen, then {"id": I, "done": true} from the socket
               the request came in on (the marker that the rest was sent)
        {"op": "burst", "run": R}         counted, no answer
        {"op": "count", "id": I, "run": R} -> {"id": I, "count": N}
    natlab_probe.py mapping --server A:P --server B:P
        -> {"local": "ip:port", "seen": {"A:P": "ip:port", ...}}
    natlab_probe.py filtering --server A:P --from X:Y ...
        contacts A:P only, then asks it to send from each X:Y
        -> {"seen": "ip:port", "received": ["X:Y", ...]}
    natlab_probe.py burst --server A:P --count N --run R
        -> {"sent": N}
    natlab_probe.py count --server A:P --run R
        -> {"count": N}
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import time


# Linux's SO_RCVBUFFORCE; Python's socket module does not name it.
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def show(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def emit(obj) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def fail(message: str) -> None:
    sys.stderr.write(f"natlab_probe: {message}\n")
    sys.exit(2)


def serve(listen: list[str]) -> None:
    sockets = {}
    selector = selectors.DefaultSelector()
    for text in listen:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # Room for a whole burst even if this process is slow to run
            # (root may exceed net.core.rmem_max).
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
        except OSError:
            pass
        sock.bind(endpoint(text))
        sockets[text] = sock
        selector.register(sock, selectors.EVENT_READ, text)
    counts: dict[str, int] = {}
    emit({"ready": sorted(sockets)})
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            try:
                data, peer = sock.recvfrom(2048)
                msg = json.loads(data)
                op = msg["op"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if op == "echo":
                sock.sendto(json.dumps({"id": msg.get("id"), "seen": show(peer)}).encode(), peer)
            elif op == "send":
                for source in msg.get("from", []):
                    if source in sockets:
                        sockets[source].sendto(json.dumps({"token": source}).encode(), peer)
                sock.sendto(json.dumps({"id": msg.get("id"), "done": True}).encode(), peer)
            elif op == "burst":
                run = str(msg.get("run"))
                counts[run] = counts.get(run, 0) + 1
            elif op == "count":
                count = counts.get(str(msg.get("run")), 0)
                sock.sendto(json.dumps({"id": msg.get("id"), "count": count}).encode(), peer)


class Client:
    """
    One UDP socket; requests are retransmitted every C{interval} until their
    answer arrives or the deadline passes.
    """

    def __init__(self, timeout: float, interval: float = 0.2):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", 0))
        self.deadline = time.monotonic() + timeout
        self.interval = interval
        self.next_id = 0
        self.tokens: list[str] = []

    def request(self, server: tuple[str, int], msg: dict, until) -> dict:
        self.next_id += 1
        msg = dict(msg, id=self.next_id)
        data = json.dumps(msg).encode()
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                fail(f"no answer to {msg} from {show(server)} before the deadline")
            self.sock.sendto(data, server)
            resend = min(now + self.interval, self.deadline)
            while (left := resend - time.monotonic()) > 0:
                self.sock.settimeout(left)
                try:
                    raw, _ = self.sock.recvfrom(2048)
                    answer = json.loads(raw)
                except socket.timeout:
                    break
                except (OSError, ValueError):
                    continue
                if "token" in answer:
                    if answer["token"] not in self.tokens:
                        self.tokens.append(answer["token"])
                elif answer.get("id") == self.next_id and until(answer):
                    return answer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="UDP probes for the NAT lab")
    parser.add_argument("mode", choices=["server", "mapping", "filtering", "burst", "count"])
    parser.add_argument("--listen", action="append", default=[])
    parser.add_argument("--server", action="append", default=[])
    parser.add_argument("--from", dest="sources", action="append", default=[])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--run", default="0")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.mode == "server":
        serve(args.listen)
        return
    client = Client(args.timeout)
    servers = [endpoint(s) for s in args.server]
    local = show(client.sock.getsockname())
    if args.mode == "mapping":
        seen = {
            show(s): client.request(s, {"op": "echo"}, lambda a: "seen" in a)["seen"]
            for s in servers
        }
        emit({"local": local, "seen": seen})
    elif args.mode == "filtering":
        server = servers[0]
        seen = client.request(server, {"op": "echo"}, lambda a: "seen" in a)["seen"]
        client.request(server, {"op": "send", "from": args.sources}, lambda a: a.get("done"))
        emit({"seen": seen, "received": sorted(client.tokens)})
    elif args.mode == "burst":
        server = servers[0]
        client.request(server, {"op": "echo"}, lambda a: "seen" in a)
        data = json.dumps({"op": "burst", "run": args.run}).encode()
        for _ in range(args.count):
            client.sock.sendto(data, server)
        emit({"sent": args.count})
    elif args.mode == "count":
        answer = client.request(servers[0], {"op": "count", "run": args.run}, lambda a: "count" in a)
        emit({"count": answer["count"]})


if __name__ == "__main__":
    main()
