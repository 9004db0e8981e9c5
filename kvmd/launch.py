"""kvmd's entry point (`kvmd`): when a previous daemon handed VMs over (systemd passed
memfds, or state files wait in the runtime directory), restore and resume them first, with
only the core and the state format loaded, then load and start the gRPC server. The guests'
pause ends as early as this process can end it; the API follows (kvmd.server.run).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from kvmd.config import ConfigError, build_parser, confine_api_cpus, load_config
    from kvmd.core.sched import shorten_api_slice
    from kvmd.logs import setup_daemon_logging

    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args)
        # Before any thread (logging starts one): every thread but vCPUs inherits it.
        slice_outcome = shorten_api_slice(cfg.api_slice_us)
        confine_api_cpus(cfg)  # the same way, inherited
        setup_daemon_logging(cfg.log_level, cfg.log_format)
    except ConfigError as exc:
        print(f"kvmd: {exc}", file=sys.stderr)
        return 2
    early = None
    if not args.take_over:
        from kvmd import handover

        if handover.pending(cfg):
            early = handover.receive_early(cfg)
    from kvmd.server import run

    return run(args, cfg, early, slice_outcome)


if __name__ == "__main__":
    sys.exit(main())
