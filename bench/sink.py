"""Where uploads end: reads the whole request body, counts it and answers with the count.

nginx could answer an upload with `return 204` before the body has arrived; this sink proves that every byte
travelled (the benchmark checks the count), while costing little more than the reads.

    .venv/bin/python bench/sink.py --port 8092
"""

from __future__ import annotations

import argparse

from aiohttp import web


async def sink(request: web.Request) -> web.Response:
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
    return web.json_response({"bytes": received})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    arguments = parser.parse_args()
    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{path:.*}", sink)
    web.run_app(app, host="127.0.0.1", port=arguments.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
