#!/usr/bin/env python3
"""
Write the seed corpora under scripts/fuzz/corpus/<target>/ from the golden
bytes the unit tests pin (tests/test_messages.py, tests/test_wire_vm.py, the
RFC 5769 vectors in tests/test_stun_codec.py, tests/test_invite.py) and a
few values built with the codecs, encoded the way each target reads its
input (scripts/fuzz/targets.py).

    .venv/bin/python scripts/fuzz/make_corpus.py

Idempotent: each file is named after the hash of its bytes; a target's
folder is emptied first.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]

from tests import (test_invite, test_job_wire, test_messages, test_stun_codec,  # noqa: E402
                   test_wire_vm)

import targets as T  # noqa: E402
from omerta.wire import envelope, job, messages, relay, stun, tunnel  # noqa: E402
from omerta.wire.invite import build_invite_body  # noqa: E402


def stun_seeds() -> list[bytes]:
    s = test_stun_codec
    txid = s.TXID
    built = [
        stun.build(stun.StunMessage(stun.Method.BINDING, stun.MessageClass.REQUEST, txid)),
        stun.build(
            stun.StunMessage(
                stun.Method.BINDING, stun.MessageClass.SUCCESS, txid,
                [(stun.Attr.XOR_MAPPED_ADDRESS, ("2001:db8::1", 7400)),
                 (stun.Attr.RESPONSE_ORIGIN, ("192.0.2.1", 3478)),
                 (stun.Attr.OTHER_ADDRESS, ("192.0.2.2", 3479)),
                 (stun.Attr.SOFTWARE, "omerta")],
            ),
            fingerprint=True,
        ),
        stun.build(
            stun.StunMessage(
                stun.Method.BINDING, stun.MessageClass.ERROR, txid,
                [(stun.Attr.ERROR_CODE, (420, "Unknown Attribute")),
                 (stun.Attr.UNKNOWN_ATTRIBUTES, [0x0024, 0x7777])],
            ),
            integrity_key=b"key", integrity_sha256=True, fingerprint=True,
        ),
        stun.build(
            stun.StunMessage(
                stun.Method.BINDING, stun.MessageClass.REQUEST, txid,
                [(stun.Attr.CHANGE_REQUEST, (True, True)), (stun.Attr.RESPONSE_PORT, 4000),
                 (stun.Attr.PADDING, b"\x00" * 8), (stun.Attr.USERNAME, "user:name")],
            ),
            integrity_key=b"key",
        ),
    ]
    return [s.SAMPLE_REQUEST, s.SAMPLE_IPV4_RESPONSE, s.SAMPLE_IPV6_RESPONSE,
            s.SAMPLE_LONG_TERM, s.CLASSIC_REQUEST, s.CLASSIC_RESPONSE, *built]


STUN_VALUES = {
    stun.Attr.CHANGE_REQUEST: (True, False),
    stun.Attr.USERNAME: "evtj:h6vY",
    stun.Attr.SOFTWARE: "STUN test client",
    stun.Attr.REALM: "example.org",
    stun.Attr.NONCE: "f//499k954d6OL34oL9FSTvy64sA",
    stun.Attr.MESSAGE_INTEGRITY: bytes(range(20)),
    stun.Attr.MESSAGE_INTEGRITY_SHA256: bytes(range(32)),
    stun.Attr.PADDING: b"\x00" * 4,
    stun.Attr.FINGERPRINT: 0xE57A3BCF,
    stun.Attr.RESPONSE_PORT: 3479,
    stun.Attr.ERROR_CODE: (438, "Stale Nonce"),
    stun.Attr.UNKNOWN_ATTRIBUTES: [0x0024, 0x8029],
}


def stun_attribute_seeds() -> list[bytes]:
    out = []
    codecs = T._STUN_CODECS
    for index, codec in enumerate(codecs):
        value = STUN_VALUES.get(codec.type)
        values = [value] if value is not None else [("192.0.2.1", 32853), ("2001:db8:1234::1", 7400)]
        for v in values:
            for classic in (0, 1):
                try:
                    raw = codec.pack(v, T._STUN_TXIDS[classic])
                except ValueError:
                    continue
                out.append(bytes((index, classic)) + raw)
    return out


def invite_link_seeds() -> list[bytes]:
    t = test_invite
    golden_payload = t.payload_of(t.GOLDEN_LINK)
    body = golden_payload[:-64]
    many = build_invite_body(
        t.KEY.secret, "lab", ["relay-1@192.0.2.7:7400", "0123456789abcdef0123456789abcdef@[2001:db8::7]:7401",
                              "host-2@relay.example.org:1"],
        t.CREATED, t.EXPIRES, T.INVITE_IDENTITY.public_key,
    )
    expired = build_invite_body(t.KEY.secret, "old", [], 1, 2, T.INVITE_IDENTITY.public_key)
    # Regression: a port of non-ASCII digits escaped parse_invite as a plain
    # ValueError from int() until b9c39dc.
    superscript_port = build_invite_body(
        t.KEY.secret, "lab", ["relay-1@192.0.2.7:\u00b2"], t.CREATED, 0, T.INVITE_IDENTITY.public_key
    )
    return [
        b"\x00" + t.GOLDEN_LINK.encode(),
        b"\x00" + t.GOLDEN_LINK[len("omerta://join/"):].encode(),
        b"\x01" + golden_payload,
        b"\x01" + t.GOLDEN_PAYLOAD,
        b"\x02" + body,
        b"\x02" + many,
        b"\x02" + expired,
        b"\x02" + superscript_port,
    ]


def frame_opener_seeds() -> list[bytes]:
    f1 = T.frame_spec(0, 0, 1, 1, b"hello")
    f2 = T.frame_spec(0, 0, 2, 3, b"")
    other_boot = T.frame_spec(0, 1, 1, 1, b"x")
    return [
        T.step(1, f1),
        T.step(1, f1) + T.step(3, b"") + T.step(1, f2),
        T.step(1, f1) + T.step(1, other_boot) + T.step(1, T.frame_spec(0, 0, 5, 1, b"old boot")),
        T.step(2, b"\x10" + f1),
        T.step(0, envelope.build_header(1, T.KEY.network_id, T.SENDERS[0], T.BOOTS[0], 1) + bytes(16)),
        b"".join(T.step(1, T.frame_spec(i & 3, i >> 2, 7, 1, b"evict")) for i in range(8)),
        T.step(1, T.frame_spec(0, 0, 3000, 1)) + T.step(1, T.frame_spec(0, 0, 1, 1)),
        # addressed to the opener, then to someone else (selector bit 5)
        T.step(1, T.frame_spec(0, 0, 1, 1 | envelope.ADDRESSED, b"to me"))
        + T.step(1, bytes((0x20,)) + T.frame_spec(0, 0, 2, 1 | envelope.ADDRESSED)[1:]),
    ]


def session_seeds() -> list[bytes]:
    sid = struct.pack("!QQ", T.SESSION_ID, 1)
    return [
        bytes((0, 0x30)) + struct.pack("!H", 2) + b"hi",
        bytes((0, 0x30)) + struct.pack("!H", 2) + b"hi" + bytes((1, 0)),
        bytes((2, 0, 5, 0x31)) + struct.pack("!H", 3) + b"req",
        T.step(3, sid + bytes(17)),
        bytes((4, 1, 0, 3, 0)) + struct.pack("!H", 4) + b"data",
        bytes((5, 6)),
        bytes((6,)) + struct.pack("!Q", 1) + struct.pack("!H", 0),
        bytes((6,)) + struct.pack("!Q", 5000) + struct.pack("!H", 3) + b"\x30ok"
        + bytes((6,)) + struct.pack("!Q", 1) + struct.pack("!H", 3) + b"\x30ok",
    ]


def protocol_seeds() -> list[bytes]:
    frame = T.frame_spec(0, 0, 1, 1, b"body")
    s = test_stun_codec
    return [
        b"\x00" + T.step(1, frame),
        b"\x00" + T.step(1, frame) + T.step(1, frame),
        b"\x01" + T.step(0, s.SAMPLE_REQUEST) + T.step(5, s.SAMPLE_IPV4_RESPONSE),
        b"\x00" + T.step(5, s.CLASSIC_REQUEST),
        b"\x08" + T.step(2, b"S" * 8 + frame),
        b"\x10" + T.step(2, b"S" * 8 + frame),
        b"\x18" + T.step(2, b"S" * 8 + frame),
        b"\x08" + T.step(3, b"S" * 8 + tunnel.header(1, 2) + bytes(20)),
        b"\x02" + T.step(3, b"S" * 8 + b"x"),
        b"\x06" + T.step(3, b"S" * 8 + b"x"),
        b"\x00" + T.step(4, struct.pack("!QQ", 1, 2) + bytes(20)),
        b"\x00" + T.step(0, b"GET / HTTP/1.1\r\n\r\n"),
    ]


def job_request_seeds() -> list[bytes]:
    ident = b"\x01" * 8
    return [
        job.build_request(job.JobOp.SUBMIT, argv=["python3", "-c", "print(6*7)"], env=["A=1"],
                          stdin=b"in", inputs=[{"path": "data.txt", "size": 3}],
                          outputs=["out.txt"], cpu_milli=500, memory_mb=128, timeout_s=60,
                          network=False, name="seed"),
        job.build_request(job.JobOp.PUT, job_id=ident, index=0, offset=0, data=b"abc"),
        job.build_request(job.JobOp.STATUS, job_id=ident),
        job.build_request(job.JobOp.LOGS, job_id=ident, stream=1, offset=0, most=4096,
                          wait_ms=5000),
        job.build_request(job.JobOp.CANCEL, job_id=ident),
        job.build_request(job.JobOp.LIST),
        job.build_request(job.JobOp.FETCH, job_id=ident, index=0, offset=0, most=4096),
    ]


def corpora() -> dict[str, list[bytes]]:
    m = test_messages
    v = test_wire_vm
    sample_frame = T.sealed_frame(T.frame_spec(0, 0, 1, 1, b"body"))
    return {
        "demux": [test_stun_codec.SAMPLE_REQUEST, test_stun_codec.CLASSIC_REQUEST,
                  sample_frame, b"", b"GET / HTTP/1.1\r\n\r\n"],
        "stun": stun_seeds(),
        "stun_attributes": stun_attribute_seeds(),
        "envelope": [sample_frame,
                     envelope.build_header(3, bytes(range(8)), bytes(range(16)), b"BOOTBOOT", 0x0102)
                     + bytes(16)],
        "frame_opener": frame_opener_seeds(),
        "messages": [bytes((int(t),)) + golden for t, _, golden in m.CASES],
        "record": [messages.build_record(m.RecordTests.RECORD)],
        "relay": [relay.session_header(b"S" * 8) + sample_frame],
        "tunnel": [tunnel.header(1, 2) + bytes(40), tunnel.header(2**64 - 1, 7) + bytes(18)],
        "invite_payload": [test_invite.GOLDEN_PAYLOAD, test_invite.payload_of(test_invite.GOLDEN_LINK)],
        "invite_link": invite_link_seeds(),
        "vm_request": [v.CREATE_BYTES, v.RELEASE_BYTES, v.LIST_BYTES, v.STATUS_BYTES],
        "vm_reply": [v.REPLY_BYTES, v.REFUSAL_BYTES],
        "job_request": job_request_seeds(),
        "job_reply": [job.build_reply(job.JobStatus.OK, "", [test_job_wire.RECORD], b"42\n", True),
                      job.build_reply(job.JobStatus.NOT_YOURS, "job 01 belongs to another")],
        "session_open": session_seeds(),
        "protocol": protocol_seeds(),
    }


def main() -> None:
    out = HERE / "corpus"
    all_seeds = corpora()
    missing = set(T.TARGETS) - set(all_seeds)
    assert not missing, f"no seeds for {sorted(missing)}"
    for name, items in sorted(all_seeds.items()):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for data in items:
            (folder / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)
        print(f"{name}: {len(set(items))} seeds")


if __name__ == "__main__":
    main()
