"""The three evaluation protocols of a replay, named once for every face.

- ``immediate``: each record scored right after its own edit (or batch), on
  the model as the sequence left it then: the per-edit ``post`` metrics (and
  ``pre``, the same record just before its edit).
- ``end of stream``: every applied record re-scored on the final model: the
  end-of-run re-scoring (the published AlphaEdit protocol).
- ``retention``: at every checkpoint, the first M applied edits of the run
  re-scored on the model as it is then (the NAS / ENCORE curves); stored as
  checkpoint rows of task :data:`RETENTION_TASK`.
"""

from __future__ import annotations

IMMEDIATE = "immediate"
END_OF_STREAM = "end of stream"
RETENTION = "retention"
PROTOCOLS = (IMMEDIATE, END_OF_STREAM, RETENTION)

#: the checkpoint task under which a retention pass is stored
RETENTION_TASK = "retention"
#: the checkpoint task of the fluency probe (generation entropy in ``value``; the
#: store names it too, as ``workbench.store.FLUENCY_TASK``)
FLUENCY_TASK = "fluency"
#: the checkpoint task of the held-out perplexity (its mean NLL in ``value``)
PERPLEXITY_TASK = "perplexity"

#: one line per protocol, for legends, table notes and help texts
DESCRIPTIONS = {
    IMMEDIATE: "each record scored right after its own edit",
    END_OF_STREAM: "every record re-scored on the final model",
    RETENTION: "the first M edits re-scored at every checkpoint",
}

__all__ = [
    "DESCRIPTIONS",
    "END_OF_STREAM",
    "FLUENCY_TASK",
    "IMMEDIATE",
    "PERPLEXITY_TASK",
    "PROTOCOLS",
    "RETENTION",
    "RETENTION_TASK",
]
