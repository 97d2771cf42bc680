"""Circuit heads from discrete SAE codes (O'Neill & Bui, "Sparse Autoencoders Enable Scalable and Reliable Circuit
Identification in Language Models").

The model runs on *positive* prompts (it can predict the next token: an indirect-object sentence) and *negative*
ones (it cannot: the repeated subject replaced by a third name). Each attention head's output (its ``hook_z``
times its rows of ``W_O``, d_model wide) is averaged over the prompt's positions; one ReLU SAE, shared by every
head, is trained on those vectors from a handful of prompts (5-10) and each (prompt, head) becomes an integer
code, the argmax of its SAE latents. A head whose codes on positive prompts include many that never occur on
negative ones is doing something specific to the task: its score is ``|P_h \\ N_h|`` (codes seen on positives,
minus codes seen on negatives), optionally divided by ``|P_h U N_h|``. No ablations are run, so it takes seconds;
``steering.patching.head_patching`` is the activation-patching baseline it is measured against
(``bench/heads.py``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from probe.errors import SteerscopeError
from probe.hooks import capture
from probe.tokens import encode_all, pad, real_mask


@torch.no_grad()
def head_outputs(model, prompts: Sequence[str], batch_size: int = 16, position: str = "mean") -> Tensor:
    """[n_prompts, n_layers, n_heads, d_model]: each head's output (z_h W_O[h]) averaged over the prompt's tokens
    (``position="mean"``, as the authors' code does) or at its last token (``"last"``)."""
    if isinstance(prompts, str) or not len(prompts):
        raise SteerscopeError("give a non-empty list of prompts")
    if position not in ("mean", "last"):
        raise SteerscopeError(f"position must be 'mean' or 'last', got {position!r}")
    seqs = encode_all(model, list(prompts))
    L = model.cfg.n_layers
    sites = [f"blocks.{layer}.attn.hook_z" for layer in range(L)]
    out = []
    for i in range(0, len(seqs), batch_size):
        tokens, lengths = pad(model, seqs[i : i + batch_size])
        mask = real_mask(lengths, tokens.shape[1]).to(model.cfg.device).float()  # [b, T]
        if position == "last":  # right-padded: only each row's last real token
            mask = torch.zeros_like(mask).scatter_(1, (lengths - 1)[:, None].to(mask.device), 1.0)
        with capture(model, sites) as acts:
            model(tokens.to(model.cfg.device), return_type=None)
        per_layer = []
        for layer, site in enumerate(sites):
            z = acts[site].float()  # [b, T, H, d_head]
            mean_z = (z * mask[:, :, None, None]).sum(1) / mask.sum(1)[:, None, None]  # linear, so mean first
            per_layer.append(torch.einsum("bhe,hed->bhd", mean_z, model.blocks[layer].attn.W_O.float()))
        out.append(torch.stack(per_layer, 1).cpu())
    return torch.cat(out)


def fit_code_sae(x: Tensor, d_sae: int = 200, l1_coeff: float = 0.02, epochs: int = 500, lr: float = 1e-3,
                 seed: int = 0):
    """A ReLU SAE (``saes.relu``) trained full-batch on rows ``x`` [n, d], scaled first so that rows lie at unit
    mean distance from their mean (``l1_coeff`` then means the same at every model's scale; rows that all
    coincide keep scale 1); returns it with the scale in ``sae.input_scale``."""
    from saes.relu import ReLUSAE

    if x.ndim != 2 or len(x) < 2:
        raise SteerscopeError(f"need [n >= 2, d] rows to train a code SAE, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise SteerscopeError("the head outputs hold NaN or inf values; check the model and prompts")
    d = x.shape[1]
    scale = float((x - x.mean(0)).norm(dim=1).mean()) or 1.0  # the spread around the mean: unit
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sae = ReLUSAE(ReLUSAE.Config(d_in=x.shape[1], d_sae=d_sae, l1_coeff=l1_coeff, site="attn.head_out"))
    xs = (x / scale).float()
    with torch.no_grad():  # a data-based start: b_dec the mean row, decoder rows drawn from the centred rows
        mean = xs.mean(0)
        sae.b_dec.copy_(mean)
        rows = (xs - mean)[torch.randint(len(xs), (d_sae,), generator=g)]
        rows = rows + 0.1 * rows.norm(dim=1, keepdim=True).mean() * torch.randn(rows.shape, generator=g) / d ** 0.5
        sae.W_dec.copy_(rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12))
        sae.W_enc.copy_(sae.W_dec.T)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for _ in range(epochs):
        loss, _ = sae.training_loss(xs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sae.input_scale = scale
    return sae.eval()


@torch.no_grad()
def head_codes(sae, acts: Tensor) -> Tensor:
    """[n_prompts, n_layers, n_heads] integer codes: the argmax latent of each (prompt, head) vector."""
    n, L, H, d = acts.shape
    codes = sae.encode(acts.reshape(-1, d).float() / sae.input_scale)
    return codes.argmax(-1).reshape(n, L, H)


def code_scores(codes: Tensor, positive: Tensor, normalise: bool = False) -> Tensor:
    """[n_layers, n_heads]: per head, the number of distinct codes seen on positive prompts and never on negative
    ones (``normalise``: divided by the number of distinct codes seen on either)."""
    positive = torch.as_tensor(positive, dtype=torch.bool)
    if positive.all() or not positive.any():
        raise SteerscopeError("code scores need both positive and negative prompts")
    _, L, H = codes.shape
    scores = torch.zeros(L, H)
    for layer in range(L):
        for h in range(H):
            p = set(codes[positive, layer, h].tolist())
            n = set(codes[~positive, layer, h].tolist())
            scores[layer, h] = len(p - n) / (len(p | n) if normalise else 1)
    return scores


@dataclass
class HeadRanking:
    """What :func:`find_heads` found: ``scores`` [n_layers, n_heads], the codes and which prompts trained the SAE."""

    scores: Tensor
    codes: Tensor
    positive: Tensor
    train: Tensor  # indices of the prompts the SAE was trained on
    seconds: float
    sae: object

    def ranking(self) -> list[tuple[int, int]]:
        """Heads, highest score first (ties: lower layer, then lower head)."""
        order = self.scores.flatten().argsort(descending=True, stable=True)
        H = self.scores.shape[1]
        return [(int(i) // H, int(i) % H) for i in order]


def find_heads(model, positive: Sequence[str], negative: Sequence[str], n_train: int = 5, d_sae: int = 200,
               l1_coeff: float = 0.02, epochs: int = 500, lr: float = 1e-3, normalise: bool = False,
               seed: int = 0, position: str = "mean") -> HeadRanking:
    """Rank ``model``'s attention heads by the codes unique to ``positive`` prompts. The SAE trains on ``n_train``
    prompts of each kind (every head's vector of each is a row); codes and scores use every prompt given;
    ``position``: see :func:`head_outputs`."""
    positive, negative = list(positive), list(negative)
    if min(len(positive), len(negative)) < 1:
        raise SteerscopeError(f"need positive and negative prompts, got {len(positive)} and {len(negative)}")
    t0 = time.perf_counter()
    acts = head_outputs(model, positive + negative, position=position)
    r = rank_heads(acts, torch.arange(len(acts)) < len(positive), n_train, d_sae, l1_coeff, epochs, lr, normalise, seed)
    r.seconds = time.perf_counter() - t0
    return r


def rank_heads(acts: Tensor, positive: Tensor, n_train: int = 5, d_sae: int = 200, l1_coeff: float = 0.02,
               epochs: int = 500, lr: float = 1e-3, normalise: bool = False, seed: int = 0) -> HeadRanking:
    """:func:`find_heads` on head outputs already computed: ``acts`` [n_prompts, n_layers, n_heads, d], ``positive``
    [n_prompts] booleans."""
    t0 = time.perf_counter()
    is_pos = torch.as_tensor(positive, dtype=torch.bool)
    if acts.ndim != 4 or len(acts) != len(is_pos):
        raise SteerscopeError(f"acts must be [n_prompts, n_layers, n_heads, d] with one label per prompt, got shape "
                              f"{tuple(acts.shape)} and {len(is_pos)} labels")
    pos, neg = is_pos.nonzero()[:, 0], (~is_pos).nonzero()[:, 0]
    if not 1 <= n_train <= min(len(pos), len(neg)):
        raise SteerscopeError(f"n_train must be between 1 and {min(len(pos), len(neg))} (prompts of each kind), got "
                              f"{n_train}")
    g = torch.Generator().manual_seed(seed)
    train = torch.cat([pos[torch.randperm(len(pos), generator=g)[:n_train]],
                       neg[torch.randperm(len(neg), generator=g)[:n_train]]])
    sae = fit_code_sae(acts[train].reshape(-1, acts.shape[-1]), d_sae, l1_coeff, epochs, lr, seed)
    codes = head_codes(sae, acts)
    return HeadRanking(code_scores(codes, is_pos, normalise), codes, is_pos, train, time.perf_counter() - t0, sae)


def agreement(scores: Tensor, truth: Sequence[tuple[int, int]], k: int | None = None) -> dict:
    """How well ``scores`` [L, H] recover the ``truth`` heads: ROC AUC over every threshold (ties count half),
    precision and recall of the top ``k`` (default ``len(truth)``) and of every head scored above zero."""
    L, H = scores.shape
    is_true = torch.zeros(L, H, dtype=torch.bool)
    for layer, h in truth:
        is_true[layer, h] = True
    s, t = scores.flatten().double(), is_true.flatten()
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if not n_pos or not n_neg:
        raise SteerscopeError("the truth set must hold some heads and leave some out")
    greater = (s[t][:, None] > s[~t][None, :]).double().sum() + 0.5 * (s[t][:, None] == s[~t][None, :]).double().sum()
    k = n_pos if k is None else k
    top = s.argsort(descending=True, stable=True)[:k]
    hits = int(t[top].sum())
    chosen = s > 0
    tp = int((chosen & t).sum())
    return {"auc": float(greater / (n_pos * n_neg)), "k": k, "precision_at_k": hits / k, "recall_at_k": hits / n_pos,
            "n_positive_score": int(chosen.sum()), "precision": tp / max(int(chosen.sum()), 1), "recall": tp / n_pos}
