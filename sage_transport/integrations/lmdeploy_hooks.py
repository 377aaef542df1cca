"""What LMDeploy 0.18 lacks for a migration backend of a third party, added from outside (LMDeploy itself unchanged).

* :func:`add_backend_name`: a ``MigrationBackend`` member of our own (LMDeploy's enum only knows ``DLSlime`` and
  ``Mooncake``) and the matching ``--migration-backend`` choice of its CLI, so the backend needs no other engine's
  name.
* :func:`fail_migrations_alone`: LMDeploy's migration loop has no notion of a failed migration: an exception from
  ``p2p_migrate`` ends the loop task, and with it every later migration of the engine. Installed, each request's
  migration runs on its own; one that raises is answered ``INTERNAL_ENGINE_ERROR`` naming the cause, its sequence
  stops, the prefill engine is told it may free the request's blocks, and the other requests and later ones
  migrate as before.

Both are idempotent and touch only what they name.
"""

from __future__ import annotations

import functools
from typing import Any

import structlog

__all__ = ["add_backend_name", "fail_migrations_alone"]

log = structlog.get_logger("sage_transport.lmdeploy")


def add_backend_name(name: str) -> Any:
    """The ``MigrationBackend`` member ``name``, added if LMDeploy does not define it, and a ``--migration-backend``
    choice of LMDeploy's CLI. A member pickles by value, so a process that unpickles LMDeploy's config must have
    imported :mod:`sage_transport.integrations.lmdeploy` (its launcher does, for every worker it spawns)."""
    from lmdeploy.pytorch.disagg.config import MigrationBackend

    if name not in MigrationBackend.__members__:
        member = object.__new__(MigrationBackend)
        member._name_ = name
        member._value_ = max(m.value for m in MigrationBackend) + 1
        member.__objclass__ = MigrationBackend  # type: ignore[attr-defined]
        type.__setattr__(MigrationBackend, name, member)
        MigrationBackend._member_names_.append(name)  # type: ignore[attr-defined]
        MigrationBackend._member_map_[name] = member
        MigrationBackend._value2member_map_[member._value_] = member
    _add_cli_choice(name)
    return MigrationBackend[name]


def _add_cli_choice(name: str) -> None:
    try:
        from lmdeploy.cli.utils import ArgumentHelper
    except ImportError:  # a build without the CLI
        return
    original = ArgumentHelper.migration_backend
    if getattr(original, "sage_choices", None) is not None:
        original.sage_choices.add(name)
        return
    choices = {name}

    @functools.wraps(original)
    def migration_backend(parser: Any) -> Any:
        action = original(parser)
        if action.choices is not None:
            action.choices = [*action.choices, *sorted(c for c in choices if c not in action.choices)]
        return action

    migration_backend.sage_choices = choices  # type: ignore[attr-defined]
    ArgumentHelper.migration_backend = staticmethod(migration_backend)


def fail_migrations_alone() -> None:
    """Make LMDeploy's ``EngineLoop`` fail a request whose migration raised, instead of its whole migration loop
    (see the module docstring)."""
    from lmdeploy.pytorch.engine.engine_loop import EngineLoop

    original = EngineLoop._migration_loop_migrate
    if getattr(original, "sage_wrapped", False):
        return

    @functools.wraps(original)
    async def migrate_each(self: Any, migration_ready: Any) -> None:
        failed = []
        for msg in list(migration_ready):
            try:
                await original(self, [msg])
            except Exception as exc:  # this request's migration failed: it alone fails
                failed.append((msg, exc))
        for msg, error in failed:
            migration_ready.remove(msg)
            await _fail(self, msg, error)

    migrate_each.sage_wrapped = True  # type: ignore[attr-defined]
    EngineLoop._migration_loop_migrate = migrate_each  # type: ignore[method-assign]


async def _fail(loop: Any, msg: Any, exc: BaseException) -> None:
    from lmdeploy.messages import ResponseType
    from lmdeploy.pytorch.engine.engine import InferOutput

    request = msg.migration_request
    reason = f"KV migration from engine {request.remote_engine_id!r} failed: {exc}"
    log.warning("lmdeploy.migration_failed", session=msg.session_id, remote_engine=request.remote_engine_id, error=str(exc))
    loop.scheduler.stop_session(msg.session_id)
    try:  # the prefill holds the blocks until told the migration is over
        await loop.engine_conn.zmq_send(remote_engine_id=request.remote_engine_id, remote_session_id=request.remote_session_id)
    except Exception as notify:  # the prefill is gone too: nothing holds the blocks there
        log.warning("lmdeploy.migration_notify_failed", session=msg.session_id, error=str(notify))
    msg.resp.type = ResponseType.INTERNAL_ENGINE_ERROR
    msg.resp.err_msg = reason
    loop.resp_queue.put_nowait({msg.session_id: InferOutput(session_id=msg.session_id, resp=msg.resp, token_ids=[], finish=True)})
