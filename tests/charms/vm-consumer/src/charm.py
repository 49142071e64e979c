#!/usr/bin/env python3
"""vm-consumer: the smallest useful requirer of the vm_host interface.

It exists to show, and to test, what a consuming charm writes and sees: the leader requests
the VMs from its config, every unit reports their state in its status.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import ops
import pydantic

from charms.vm_host.v0.vm_host import (
    VmFailedEvent,
    VmHostRequirer,
    VmReadyEvent,
    VmRemovedEvent,
    VmRequest,
)

logger = logging.getLogger(__name__)

DEFAULT_REQUESTS: list[dict[str, Any]] = [{"id": "db-0", "cores": 1, "memory": 1024}]
RELATION = "vm-host"


class ConfigError(ValueError):
    """The `requests` config option cannot be used; the message says how to fix it."""


class VmConsumerCharm(ops.CharmBase):
    """Requests VMs from vm-host and shows them in its status."""

    def __init__(self, framework: ops.Framework):
        super().__init__(framework)
        self.vm_host = VmHostRequirer(self, relation_name=RELATION)
        for event in (
            self.on.leader_elected,
            self.on.config_changed,
            self.on.upgrade_charm,
            self.on[RELATION].relation_created,
        ):
            framework.observe(event, self._request)
        framework.observe(self.vm_host.on.vm_ready, self._on_vm_ready)
        framework.observe(self.vm_host.on.vm_failed, self._on_vm_failed)
        framework.observe(self.vm_host.on.vm_removed, self._on_vm_removed)
        framework.observe(self.on.collect_unit_status, self._on_collect_status)

    def _wanted(self) -> list[VmRequest]:
        """The requests the config asks for, validated as the library will write them."""
        raw = str(self.config.get("requests") or "").strip()
        items: Any = DEFAULT_REQUESTS
        if raw:
            try:
                items = json.loads(raw)
            except ValueError:
                raise ConfigError("config requests is not JSON; give a JSON array") from None
            if not isinstance(items, list):
                raise ConfigError("config requests must be a JSON array of requests")
        try:
            return [VmRequest.model_validate(item) for item in items]  # pyright: ignore[reportUnknownVariableType]
        except pydantic.ValidationError as err:
            fields = sorted(
                {".".join(str(p) for p in e["loc"]) or "request" for e in err.errors()}
            )
            raise ConfigError(f"config requests: invalid {', '.join(fields)}") from None

    def _request(self, _: ops.EventBase) -> None:
        if not self.unit.is_leader():
            return
        try:
            wanted = self._wanted()
        except ConfigError as err:
            logger.warning("not requesting VMs: %s", err)
            return
        try:
            self.vm_host.request_vms(wanted)
        except pydantic.ValidationError:
            logger.warning("not requesting VMs: request ids must be unique")

    def _on_vm_ready(self, event: VmReadyEvent) -> None:
        logger.info("vm %s ready on %s", event.vm.id, event.vm.unit)

    def _on_vm_failed(self, event: VmFailedEvent) -> None:
        logger.warning("vm %s failed on %s: %s", event.vm.id, event.vm.unit, event.vm.error)

    def _on_vm_removed(self, event: VmRemovedEvent) -> None:
        logger.info("vm %s removed", event.vm_id)

    def _on_collect_status(self, event: ops.CollectStatusEvent) -> None:
        try:
            wanted = self._wanted()
        except ConfigError as err:
            event.add_status(ops.BlockedStatus(str(err)))
            return
        if not self.model.relations[RELATION]:
            event.add_status(ops.BlockedStatus("needs a vm-host relation: juju integrate"))
            return
        active: list[str] = []
        for request in wanted:
            vm = self.vm_host.vm(request.id)
            if vm is None:
                event.add_status(ops.WaitingStatus(f"waiting for vm {request.id}"))
            elif vm.state == "failed":
                event.add_status(ops.BlockedStatus(f"vm {vm.id} failed: {vm.error}"))
            elif vm.state != "running":
                event.add_status(ops.WaitingStatus(f"vm {vm.id} {vm.state}"))
            else:
                macs = ",".join(nic.mac for nic in vm.interfaces if nic.mac) or "no NIC"
                active.append(f"vm {vm.id} running at {macs}")
        event.add_status(ops.ActiveStatus("; ".join(active)))


if __name__ == "__main__":  # pragma: nocover
    ops.main(VmConsumerCharm)
