"""python -m proxy: run the proxy (and its subcommands)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from proxy.errors import ConfigError
from proxy.serve import serve
from proxy.settings import Settings


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["report"]:
            from proxy.report import main as report_main

            return report_main(args[1:])
        if args[:1] == ["demo"]:
            from proxy.demo import main as demo_main

            return demo_main(args[1:])
        if args[:2] == ["images", "backfill"]:
            from proxy.backfill import main as backfill_main

            return backfill_main(args[2:])
        if args[:2] == ["semantic", "calibrate"]:
            from proxy.calibrate import main as calibrate_main

            return calibrate_main(args[2:])
        if args[:1] == ["purge"]:
            from proxy.purge import main as purge_main

            return purge_main(args[1:])
        if args[:1] == ["healthcheck"]:
            from proxy.serve import healthcheck

            return healthcheck(
                Settings.from_args(
                    args[1:],
                    prog="python -m proxy healthcheck",
                    description="Exit 0 if the proxy running on this machine answers "
                    "/_proxy/health (it finds the URL in the data folder, else --host and "
                    "--port), else 1 with one line saying why.",
                    epilog=None,
                    only=("data_dir", "host", "port"),
                )
            )
        if args[:1] == ["fake-upstream"]:
            from proxy.testing.fake_openai import main as fake_main

            return fake_main(args[1:])
        settings = Settings.from_args(args)
        from proxy.app import build_state

        build_state(settings)  # fail fast, in one line, on a bad setting or rule
        return serve(settings)
    except ConfigError as exc:
        print(f"openai-cache-proxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
