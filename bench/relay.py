#!/usr/bin/env python3
"""A bare asyncio byte relay, the yardstick for the paced-stream figures.

Each client connection gets its own connection to the upstream port, and bytes are copied both ways
as they come, with no HTTP parsing at all. What it adds to a paced stream's first delta is what one
more Python process hop costs on the machine (a wake-up after 50 ms asleep, a read, a write, on each
side), before any of the gateway's work.

    python bench/relay.py --port 8901 --upstream-port 8900
"""
from __future__ import annotations

import argparse
import asyncio
import signal

HOST = "127.0.0.1"


async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(port: int, upstream_port: int) -> None:
    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(HOST, upstream_port)
        except OSError:
            client_writer.close()          # the client sees the connection close, as with no upstream
            return
        await asyncio.gather(copy(client_reader, upstream_writer), copy(upstream_reader, client_writer))

    server = await asyncio.start_server(relay, HOST, port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()
