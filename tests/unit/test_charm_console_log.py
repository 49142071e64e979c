"""The console-log action: the tail of a VM's serial console, as the backend keeps it."""

from __future__ import annotations

import pytest
from ops import testing

pytestmark = pytest.mark.usefixtures("fake_host")


def console_log(ctx, **params):
    ctx.run(ctx.on.action("console-log", params=params), testing.State(leader=True))
    return ctx.action_results or {}


def compose(ctx):
    ctx.run(
        ctx.on.action("compose-vm", params={"name": "web-0", "memory": 512}),
        testing.State(leader=True),
    )


def test_the_last_lines_of_the_console(ctx, backend):
    compose(ctx)
    backend.consoles["web-0"] = "\n".join(f"line {i}" for i in range(500))
    got = console_log(ctx, name="web-0", lines=3)
    assert got == {"name": "web-0", "lines": 3, "log": "line 497\nline 498\nline 499"}
    assert "console_log:web-0:3" in backend.calls
    assert console_log(ctx, name="web-0")["lines"] == 100  # the default


def test_before_any_output_it_says_so(ctx, backend):
    compose(ctx)
    assert console_log(ctx, name="web-0")["log"] == "(no output yet)"


@pytest.mark.parametrize(
    ("params", "phrase"),
    [
        ({"name": "nope"}, "no console log: VM 'nope' does not exist"),
        ({"name": "Bad/Name"}, "bad parameters, nothing done: name"),
        ({"name": "web-0", "lines": 0}, "bad parameters, nothing done: lines"),
        ({"name": "web-0", "lines": 100001}, "bad parameters, nothing done: lines"),
    ],
)
def test_bad_requests_fail_naming_the_field(ctx, backend, params, phrase):
    compose(ctx)
    with pytest.raises(testing.ActionFailed) as failed:
        console_log(ctx, **params)
    assert phrase in failed.value.message
