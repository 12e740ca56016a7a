"""Runs bqemulator with a large worker pool for its synchronous gRPC handlers.

bqemulator serves each AppendRows stream on a thread of asyncio's default executor (min(32, cores + 4) threads:
6 on a 2-core machine). A client killed mid-stream (what the crash tests do) leaves its thread blocked for good, so
after a few kills every gRPC call hangs. A pool of 256 threads outlasts a test session. Test-side only.

It also skips the AUTO snapshot bqemulator takes after every write (for `FOR SYSTEM_TIME AS OF`, which nagare's
tests never use): each one copies the whole table inside DuckDB while holding the emulator's write lock, so a test
appending thousands of small batches made the emulator quadratically slower and its memory grow without bound.
Explicit (USER) snapshots still work.

And it runs every DuckDB write of an AppendRows stream on the event loop's thread. bqemulator shares one DuckDB
connection between the event loop (REST, query/MERGE jobs, unary gRPC calls, all run inline) and the threads serving
AppendRows (which insert `_default`-stream rows directly); DuckDB connections are not safe to use from two threads at
once, and a test writing the `_default` stream while another ran MERGE jobs hung the emulator for good on CI.
"""
import asyncio
import concurrent.futures
import sys

_pool = concurrent.futures.ThreadPoolExecutor(max_workers=256, thread_name_prefix="bqemu-grpc")
_run_in_executor = asyncio.BaseEventLoop.run_in_executor


_loop = None


def _wide_run_in_executor(self, executor, func, *args):
    global _loop
    _loop = self
    return _run_in_executor(self, executor or _pool, func, *args)


asyncio.BaseEventLoop.run_in_executor = _wide_run_in_executor

from bqemulator.versioning.snapshots import SnapshotManager  # noqa: E402

_capture = SnapshotManager.capture


def _capture_user_snapshots_only(self, project_id, dataset_id, table_id, *, kind="AUTO"):
    return None if kind == "AUTO" else _capture(self, project_id, dataset_id, table_id, kind=kind)


SnapshotManager.capture = _capture_user_snapshots_only

from bqemulator.grpc_api.write_servicer import BigQueryWriteHandler  # noqa: E402

_flush_to_target = BigQueryWriteHandler._flush_to_target


def _flush_on_the_loop(self, stream, rows):
    try:
        asyncio.get_running_loop()
        on_loop = True
    except RuntimeError:
        on_loop = False
    if on_loop or _loop is None:
        return _flush_to_target(self, stream, rows)
    done = concurrent.futures.Future()

    def run():
        try:
            done.set_result(_flush_to_target(self, stream, rows))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            done.set_exception(exc)

    _loop.call_soon_threadsafe(run)
    return done.result()


BigQueryWriteHandler._flush_to_target = _flush_on_the_loop

from bqemulator.cli import main  # noqa: E402

sys.argv[0] = "bqemulator"
sys.exit(main())
