"""Replaying recorded journey histories against today's workflow code.

Temporal replays a journey's history whenever a worker picks it up again, so a change to a
journey that customers are already in must make the same decisions for the same history, or
put the new behaviour behind `workflow.patched(...)`. The histories in `tests/histories/` were
recorded from real runs on the time-skipping server. `python -m tests.test_replay_histories`
records them again, and its `--help` shows how to add one beside the old ones. The test fails
when a code change would break journeys in flight.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from workflows.registry import JOURNEYS

HISTORIES = Path(__file__).parent / "histories"


def recorded_histories() -> list[Path]:
    return sorted(HISTORIES.glob("*.json"))


def test_histories_are_recorded() -> None:
    names = {path.stem for path in recorded_histories()}

    assert {"abandoned_cart", "post_purchase", "welcome", "browse_abandonment", "re_engagement"} <= names


@pytest.mark.parametrize("path", recorded_histories(), ids=lambda path: path.stem)
async def test_recorded_history_replays_without_divergence(path: Path) -> None:
    recorded = json.loads(path.read_text())
    history = WorkflowHistory.from_json(recorded["workflow_id"], recorded["history"])
    replayer = Replayer(
        workflows=list(JOURNEYS),
        data_converter=pydantic_data_converter,
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules("pydantic", "bisik")
        ),
    )

    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)

    assert result.replay_failure is None, f"{path.name}: {result.replay_failure}"


async def _record(only: list[str], suffix: str) -> None:  # pragma: no cover - run by hand
    """Run each journey (or those in `only`) once on the time-skipping server and save its history.

    With a `suffix` the files are `<journey>-<suffix>.json`, kept beside the older recordings: a
    journey changed behind `workflow.patched` keeps its old history and gains one of the new path.
    """
    import asyncpg  # noqa: F401 - the worker's activities need the database

    from activities.db import create_pool, migrate
    from bisik.settings import Settings
    from tests.helpers import store_call
    from workers.relay import signal_with_start
    from workers.stack import EmbeddedPostgres, MailSink, free_port, package_binary
    from workers.worker import build_worker
    from temporalio.testing import WorkflowEnvironment
    import tempfile

    folder = Path(tempfile.mkdtemp())
    postgres = EmbeddedPostgres(folder / "pg", delete_on_stop=True)
    url = postgres.start()
    await migrate(url)
    pool = await create_pool(url)
    sink = MailSink("127.0.0.1", free_port())
    sink.start()
    settings = Settings(_env_file=None, database_url=url, smtp_port=sink.port, frequency_caps="", quiet_hours="off")  # type: ignore[call-arg]
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=pydantic_data_converter, test_server_existing_path=package_binary("temporal-test-server")
    )
    HISTORIES.mkdir(exist_ok=True)
    try:
        async with build_worker(env.client, pool, settings) as worker:
            now = await env.get_current_time()
            await store_call(pool, {"type": "identify", "userId": "replay", "traits": {"email": "replay@example.com", "first_name": "Rani"}, "timestamp": now.isoformat()})
            product = {"product_id": "p1", "name": "Tea", "category": "drinks", "price": 3.5}
            runs = {
                "abandoned_cart": {"type": "track", "userId": "replay", "event": "Product Added", "properties": product},
                "post_purchase": {"type": "track", "userId": "replay", "event": "Order Completed", "properties": {"order_id": "o-1", "total": 3.5, "products": [product]}},
                "welcome": {"type": "track", "userId": "replay", "event": "Signed Up"},
                "browse_abandonment": None,
                "re_engagement": {"type": "track", "userId": "replay", "event": "Signed Up", "messageId": "replay-signed-up-2"},
            }
            for journey, call in runs.items():
                if only and journey not in only:
                    continue
                if call is None:
                    viewed = {**product, "product_id": "p2", "name": "Coffee"}
                    for _ in range(2):
                        event = await store_call(pool, {"type": "track", "userId": "replay", "event": "Product Viewed", "properties": viewed, "timestamp": now.isoformat()})
                else:
                    event = await store_call(pool, {**call, "timestamp": now.isoformat()})
                handle = await signal_with_start(env.client, journey=journey, event=event, task_queue=worker.task_queue, search_attributes=False)
                await handle.result()
                history = await handle.fetch_history()
                name = f"{journey}-{suffix}" if suffix else journey
                (HISTORIES / f"{name}.json").write_text(
                    json.dumps({"workflow_id": handle.id, "history": json.loads(history.to_json())}, indent=1)
                )
    finally:
        await env.shutdown()
        sink.stop()
        await pool.close()
        postgres.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    import argparse

    parser = argparse.ArgumentParser(description="Record journey histories for the replay test.")
    parser.add_argument("journeys", nargs="*", help="journeys to record; all when none is named")
    parser.add_argument("--suffix", default="", help="save as <journey>-<suffix>.json beside older recordings")
    arguments = parser.parse_args()
    asyncio.run(_record(arguments.journeys, arguments.suffix))
