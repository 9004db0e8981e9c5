"""Live migration between two daemons.

`precopy` is the source's loop (full copy, dirty rounds, switch-over) against a small
`Transport` interface; `transport` is the daemon-to-daemon gRPC link beside it; `incoming`
is the target's side (one-time tokens, the VM built out of sight until the commit);
`registry` holds the migrations of one daemon. The bytes on the wire are the snapshot
format of kvmd.state: memory-only snapshots for the pre-copy rounds, then a diff snapshot
with the complete state.
"""
