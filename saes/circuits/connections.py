"""Weights-based, prompt-free connections of one transcoder feature (Dunefsky et al.).

Through the residual stream a feature ``i'`` of an earlier layer writes ``W_dec[i']`` and a feature ``i`` of a
later layer reads ``W_enc[:, i]``, so ``W_dec[i'] . W_enc[:, i]`` is how strongly the first drives the second
on every input (attention and LayerNorm ignored); ``W_E[tok] . W_enc[:, i]`` is the same for token
embeddings (the feature's de-embedding). The Feature page of a transcoder store and the Circuit page list
them; :func:`saes.circuits.validate.virtual_weight_agreement` measures how well they rank prompt-graph edges.
"""

from __future__ import annotations

import torch

from probe.errors import SteerscopeError
from saes.circuits.layers import Transcoders


def _check(tcs: Transcoders, layer: int, feature: int) -> None:
    d_sae = tcs[layer].cfg.d_sae
    if not 0 <= feature < d_sae:
        raise SteerscopeError(f"feature {feature} is out of range: the layer-{layer} transcoder has {d_sae} features")


def _top(rows: list[tuple[int, torch.Tensor]], k: int) -> list[dict]:
    """The ``k`` largest |weights| over every layer's vector (ties: the lower layer, then the lower feature)."""
    cands = []
    for layer, vals in rows:
        top = vals.abs().topk(min(k, len(vals)))
        cands += [(-float(a), layer, int(i), float(vals[i])) for a, i in zip(top.values, top.indices, strict=True)]
    return [{"layer": L, "feature": i, "weight": w} for _, L, i, w in sorted(cands)[:k]]


@torch.no_grad()
def upstream(tcs: Transcoders, layer: int, feature: int, k: int = 8) -> list[dict]:
    """Earlier layers' features that write most strongly into ``feature``'s encoder: ``W_dec^(l') . W_enc[:, i]``."""
    _check(tcs, layer, feature)
    enc = tcs[layer].W_enc[:, feature].double()
    return _top([(L, tcs[L].W_dec.double() @ enc) for L in tcs.layers if L < layer], k)


@torch.no_grad()
def downstream(tcs: Transcoders, layer: int, feature: int, k: int = 8) -> list[dict]:
    """Later layers' features that ``feature``'s decoder row drives most strongly: ``W_dec[i] . W_enc^(l')``."""
    _check(tcs, layer, feature)
    dec = tcs[layer].W_dec[feature].double()
    return _top([(L, dec @ tcs[L].W_enc.double()) for L in tcs.layers if L > layer], k)


@torch.no_grad()
def de_embedding(model, tcs: Transcoders, layer: int, feature: int, k: int = 10) -> list[dict]:
    """The tokens whose embeddings drive ``feature`` most: the top of ``W_E . W_enc[:, i]`` (largest first)."""
    _check(tcs, layer, feature)
    if model.cfg.d_model != tcs[layer].cfg.d_in:
        raise SteerscopeError(f"the layer-{layer} transcoder reads width {tcs[layer].cfg.d_in}, the model's embeddings "
                              f"have {model.cfg.d_model}")
    scores = model.W_E.double() @ tcs[layer].W_enc[:, feature].double().to(model.W_E.device)
    top = scores.topk(min(k, len(scores)))
    return [{"token_id": int(i), "token": model.tokenizer.decode([int(i)]) if model.tokenizer is not None else str(int(i)),
             "score": float(s)} for s, i in zip(top.values, top.indices, strict=True)]
