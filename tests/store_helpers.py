"""What the store's test modules share: a request and one edit row added with factors
(the ``db_path`` and ``store`` fixtures are in ``conftest.py``)."""

from __future__ import annotations

import torch

from workbench.store import Store

REQ = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}


def _add(store: Store, run_id: str, seq: int, **kw):
    gen = torch.Generator().manual_seed(seq)
    u = kw.pop("u", torch.randn(8, generator=gen))
    v = kw.pop("v", torch.randn(6, generator=gen))
    args = dict(request=REQ, mode="rrome", layer=5, weight_name="w.5", u=u, v=v)
    args.update(kw)
    return store.add_edit(run_id, seq, **args)
