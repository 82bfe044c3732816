"""The workbench's SQLite store: runs, edits (with their rank-one factors),
GLUE/fluency checkpoints, generations and end-of-run re-scoring.

One ``sqlite3`` connection in WAL mode with a busy timeout. Every write is
its own ``BEGIN IMMEDIATE`` transaction of plain parameterised SQL, committed
before the method returns, so an interrupted replay keeps every finished edit;
reads use sqlite-utils' ``query``.

One writer per run: :meth:`Store.acquire_writer` takes an exclusive ``flock``
on ``<db>.<run_id>.lock``. The kernel drops the lock when the holder dies
(SIGKILL included), so a resume after a crash just takes it over. Every
writing method checks the lock: writes to a run whose lock is held by someone
else raise :class:`RunLockedError`.

Schema changes go through :data:`MIGRATIONS` (applied in order, the version
kept in ``meta``); a database newer than this code raises
:class:`SchemaTooNewError`.

The package, by seam: ``errors`` (the named errors), ``records`` (what reads
return, and the field vocabularies), ``schema`` (migrations), ``lock`` (the
writer lock), ``codec`` (JSON and factor blobs), ``export`` (JSON / CSV),
``connection`` (opening, transactions, leases), ``results`` (checkpoints,
generations, rescore) and ``store`` (:class:`Store`: runs and edits).

Typical replay use::

    with Store.open() as store:
        run = store.create_run(model="smollm2-135m", mode="rrome", kind="replay")
        with store.acquire_writer(run.id):
            store.add_edit(run.id, 0, request=req, mode="rrome", layer=5,
                           weight_name="model.layers.5.mlp.down_proj.weight", u=u, v=v)
            store.set_status(run.id, "finished")
"""

from __future__ import annotations

from .connection import Access, ReadOnlyStoreError
from .errors import (
    AmbiguousRunError,
    CorruptDatabaseError,
    DatabaseLockedError,
    DuplicateCheckpointError,
    DuplicateEditError,
    ForeignDatabaseError,
    InvalidFieldError,
    MissingFactorsError,
    RunLockedError,
    SchemaTooNewError,
    StoreClosedError,
    StoreError,
    StoreNotFoundError,
    UnknownEditError,
    UnknownRunError,
)
from .location import APP_NAME, DB_ENV_VAR
from .lock import WriterLease
from .records import (
    DEFAULT_BUSY_TIMEOUT_S,
    FLUENCY_TASK,
    RESUMABLE_STATUSES,
    RUN_KINDS,
    RUN_STATUSES,
    Checkpoint,
    Edit,
    Generation,
    Rescore,
    Run,
    RunKind,
    RunStatus,
    default_db_path,
)
from .schema import MIGRATIONS, SCHEMA_VERSION
from .store import Store
from .writer import WriterInfo

__all__ = [
    "APP_NAME",
    "Access",
    "DB_ENV_VAR",
    "DEFAULT_BUSY_TIMEOUT_S",
    "FLUENCY_TASK",
    "MIGRATIONS",
    "RESUMABLE_STATUSES",
    "RUN_KINDS",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "AmbiguousRunError",
    "Checkpoint",
    "CorruptDatabaseError",
    "DatabaseLockedError",
    "DuplicateCheckpointError",
    "DuplicateEditError",
    "Edit",
    "ForeignDatabaseError",
    "Generation",
    "InvalidFieldError",
    "MissingFactorsError",
    "Rescore",
    "Run",
    "RunKind",
    "ReadOnlyStoreError",
    "RunLockedError",
    "RunStatus",
    "SchemaTooNewError",
    "Store",
    "StoreClosedError",
    "StoreError",
    "StoreNotFoundError",
    "UnknownEditError",
    "UnknownRunError",
    "WriterInfo",
    "WriterLease",
    "default_db_path",
]
