"""Runs bqemulator with a large worker pool for its synchronous gRPC handlers.

bqemulator serves each AppendRows stream on a thread of asyncio's default executor (min(32, cores + 4) threads:
6 on a 2-core machine). A client killed mid-stream (what the crash tests do) leaves its thread blocked for good, so
after a few kills every gRPC call hangs. A pool of 256 threads outlasts a test session. Test-side only.
"""
import asyncio
import concurrent.futures
import sys

_pool = concurrent.futures.ThreadPoolExecutor(max_workers=256, thread_name_prefix="bqemu-grpc")
_run_in_executor = asyncio.BaseEventLoop.run_in_executor


def _wide_run_in_executor(self, executor, func, *args):
    return _run_in_executor(self, executor or _pool, func, *args)


asyncio.BaseEventLoop.run_in_executor = _wide_run_in_executor

from bqemulator.cli import main  # noqa: E402

sys.argv[0] = "bqemulator"
sys.exit(main())
