"""Rendezvous ports are drawn where no outgoing connection can be handed them in the meantime: below the
kernel's ephemeral range (a port from ``bind(0)`` went to another connection before a rank listened on it)."""

from __future__ import annotations

import socket

from rl.workers.base import _ephemeral_range, free_port


def test_free_ports_lie_below_the_ephemeral_range_and_can_be_bound():
    low, _ = _ephemeral_range()
    ports = [free_port() for _ in range(20)]
    assert all(20000 <= p < low for p in ports), ports
    assert len(set(ports)) > 1  # drawn at random, not the same port for every caller
    with socket.socket() as s:
        s.bind(("", ports[0]))
