"""Connecting to Temporal, and the search attributes journeys need."""

from __future__ import annotations

import asyncio

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError

from bisik.logs import get_logger
from bisik.models import CUSTOMER_ID_ATTRIBUTE, JOURNEY_ATTRIBUTE
from bisik.settings import Settings

log = get_logger(__name__)

SEARCH_ATTRIBUTES = {
    CUSTOMER_ID_ATTRIBUTE.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    JOURNEY_ATTRIBUTE.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
}


async def connect(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )


async def connect_with_retry(settings: Settings, stop: asyncio.Event | None = None) -> Client | None:
    """Connect, retrying with backoff while Temporal is unreachable; None if `stop` is set first."""
    delay = 0.5
    while True:
        try:
            return await connect(settings)
        except RuntimeError as error:
            log.warning(
                "temporal.unavailable",
                address=settings.temporal_address,
                error=str(error),
                retry_in_seconds=delay,
            )
        if stop is None:
            await asyncio.sleep(delay)
        else:
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
                return None
            except TimeoutError:
                pass
        delay = min(delay * 2, 10.0)


async def register_search_attributes(client: Client, namespace: str) -> list[str]:
    """Add the `CustomerId` and `Journey` search attributes where missing; return those added."""
    existing = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    known = set(existing.custom_attributes) | set(existing.system_attributes)
    missing = {name: kind for name, kind in SEARCH_ATTRIBUTES.items() if name not in known}
    if not missing:
        return []
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
        )
    except RPCError as error:
        raise RuntimeError(f"registering search attributes {sorted(missing)} failed: {error}") from error
    log.info("temporal.search_attributes_registered", attributes=sorted(missing))
    return sorted(missing)
