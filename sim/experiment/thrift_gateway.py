"""A stand-in for HBase's Thrift gateway process in the storage fault experiment: a TCP relay, nothing else.

In a real deployment ``hbase thrift start`` is a stateless process between the hub and the cluster: it holds no
data, so killing it loses connections and in-flight calls, never rows. The HBase test double
(``sim.hbase_double``) is gateway and cluster in one process and keeps its rows in memory, so killing *it* would
also wipe the "cluster" — a failure HBase (WAL on three HDFS replicas) does not have. This relay is the part that
may die: the hub talks to it, it forwards bytes both ways to the double, and ``kill -9`` of this process does to
the hub what the death of a real gateway does (connections reset, calls fail, reconnects refused until it is
back), while the data stays in the double.

    python -m sim.experiment.thrift_gateway --listen-port P --upstream-port Q [--ready-file F]

asyncio transports set ``TCP_NODELAY`` on both sides, as the real gateway and thriftpy2 do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()


async def serve(host: str, listen_port: int, upstream_host: str, upstream_port: int, ready_file: Path | None,
                stop: asyncio.Event) -> None:
    """Relay every connection to ``listen_port`` to the upstream until ``stop`` is set."""

    async def relay(down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(upstream_host, upstream_port)
        except OSError:
            down_w.close()
            return
        await asyncio.gather(_pipe(down_r, up_w), _pipe(up_r, down_w))

    server = await asyncio.start_server(relay, host, listen_port, reuse_address=True)
    async with server:
        if ready_file is not None:
            tmp = ready_file.with_name(ready_file.name + ".tmp")
            tmp.write_text(f"{server.sockets[0].getsockname()[1]}\n")
            os.replace(tmp, ready_file)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Entry point; serves until SIGTERM / SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m sim.experiment.thrift_gateway",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--upstream-host", default="127.0.0.1")
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--ready-file", type=Path, help="the listening port is written here once it accepts")
    args = parser.parse_args(argv)

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.host, args.listen_port, args.upstream_host, args.upstream_port, args.ready_file, stop)

    asyncio.run(go())
    return 0


if __name__ == "__main__":
    sys.exit(main())
