"""ListVms paging by message size: a page stops before the VM that would take it past the
daemon's message budget (max_message_bytes less room for the other fields)."""

from __future__ import annotations

from api_support import DaemonFactory

from kvmd.api.base import MESSAGE_OVERHEAD
from kvmd_proto import vmm_pb2 as pb

BUDGET = 20_000


def test_a_page_never_exceeds_the_message_budget(daemon_factory: DaemonFactory) -> None:
    """VMs of about 8 KB each: two fit the 20 KB budget and a third would not, so every
    page holds two, and the pages together still list every VM once."""
    api = daemon_factory(max_message_bytes=BUDGET + MESSAGE_OVERHEAD)
    labels = {f"k{i:02d}" + "k" * 250: "v" * 256 for i in range(15)}
    for i in range(5):
        api.create_vm(f"big{i}", labels=labels)
    seen: list[str] = []
    token = ""
    while True:
        page = api.vms.ListVms(pb.ListVmsRequest(page_token=token))
        assert sum(v.ByteSize() + 8 for v in page.vms) <= BUDGET
        assert len(page.vms) == (2 if page.next_page_token else 1)
        seen += [v.vm_id for v in page.vms]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"big{i}" for i in range(5)]
