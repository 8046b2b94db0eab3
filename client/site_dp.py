"""Site-level DP at the site: the site clips its own update, whatever the server asks.

With ``dp = "site"`` the stated epsilon holds only if every update the server averages
has norm at most C (the ``clipping-norm``). Flower's ``fixedclipping_mod`` clips when the
server's fit message carries a clipping norm, i.e. when the server really runs the DP
wrapper; a server that leaves the key out would receive unclipped updates. So the site
clips here too, from the run config it has checked against its own policy, before the
update reaches Flower's mods (SecAgg+ masks what this returns). Clipping twice to the
same norm changes nothing; a smaller norm from the server clips further.
"""

import numpy as np


def clip_site_update(
    trained: list[np.ndarray], received: list[np.ndarray], clipping_norm: float
) -> list[np.ndarray]:
    """``received`` plus the update ``trained - received`` clipped to L2 norm ``clipping_norm``.

    The norm is taken over all arrays together, as Flower's client-side fixed clipping
    does (its own ``compute_clip_model_update`` does the work).

    Raises
    ------
    ValueError
        When ``clipping_norm`` is not positive (the run config already refuses that).
    """
    from flwr.supercore.differential_privacy import compute_clip_model_update

    if not clipping_norm > 0:
        raise ValueError("site-level DP needs a positive clipping norm")
    out = [np.array(a, copy=True) for a in trained]
    base = [np.asarray(a) for a in received]
    compute_clip_model_update(out, base, clipping_norm)
    return [a.astype(t.dtype, copy=False) for a, t in zip(out, trained, strict=True)]
