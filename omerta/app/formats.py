"""
Text forms of the documents the commands print, with no dependencies beyond
the standard library: the fast path through a running node
(L{omerta.app.fast}) formats with them before anything heavy is imported.
Every string in them may come from another peer (names, endpoints, a
provider's VM records): each cell goes through L{printable}.
"""

from __future__ import annotations

from omerta.safe_text import printable


def resources_text(resources: dict) -> str:
    if not any(resources.values()):
        return "-"
    return (
        f"cpu {resources['cpu_cores']}, {resources['memory_mb']} MB,"
        f" {resources['disk_gb']} GB, gpu {resources['gpus']}"
    )


def format_peers(peers: list[dict]) -> str:
    if not peers:
        return "no peers known"
    rows = [("PEER ID", "NAME", "STATE", "RTT", "NAT", "CAPABILITIES", "ENDPOINTS", "RESOURCES")]
    for p in peers:
        rows.append(tuple(printable(cell) for cell in (
            p["peer_id"],
            p["name"] or "-",
            p["state"] if not p.get("gone") else f"{p['state']} ({p['gone']})",
            "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.1f} ms",
            str(p["nat_type"]),
            ",".join(p["capabilities"]) or "-",
            " ".join(path["endpoint"] for path in p["paths"]) or "-",
            resources_text(p["resources"]),
        )))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
        for row in rows
    ).rstrip()


def tunnel_cell(tunnel: dict) -> str:
    """A tunnel in one cell: C{up (direct)}, or the first words of why there is none."""
    state = tunnel.get("state", "-")
    if "interface" in tunnel:
        return f"{state} ({tunnel.get('path_kind') or 'no path'})"
    return state.split(":", 1)[0]


def format_vm_list(document: dict) -> str:
    vms = document["vms"]
    if not vms:
        return "no VMs held"
    rows = [("VM", "PROVIDER", "STATE", "CPU", "MEMORY", "DISK", "ADDRESS", "TUNNEL")]
    for v in vms:
        rows.append(tuple(printable(cell) for cell in (
            v["vm_id"], v["provider_name"] or v["provider"][:16], v["state"],
            str(v["vcpus"]), f"{v['memory_mb']} MiB", f"{v['disk_gb']} GiB",
            v["address"] or "-", tunnel_cell(v.get("tunnel") or {}))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
