"""kvmd.state: the versioned, checksummed format of a VM's state (snapshots, migration and
daemon take-over): the state model <-> protobuf, the record stream, sparse guest memory,
and the procedures that save a VM into it and restore one from it. Imports flow
api/server -> migration/handover -> state -> core -> kvm."""
