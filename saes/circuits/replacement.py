"""The replacement model of an attribution graph: the prompt's operating point and the frozen affine forward.

At the prompt, attention patterns, LayerNorm scales and MLP outputs are cached; each MLP output is split into
its transcoder's active features, the transcoder's bias and an error. :meth:`Replacement.run` replays the model
with patterns and scales frozen and a zero leaf added at every source site (token embeddings, each layer's MLP
output), so one backward pass from a batch of targets gives each source's gradient (see
:mod:`saes.circuits.attribution`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor

from probe.errors import SteerscopeError
from probe.hooks import hooks
from probe.tokens import has_bos
from saes.circuits.layers import Transcoders


class Replacement:
    """The prompt's operating point (patterns, LN scales, MLP outputs, features) and the frozen affine forward."""

    def __init__(self, model, tcs: Transcoders, tokens: Tensor):
        tcs.check_model(model)
        missing = [L for L in range(model.cfg.n_layers) if L not in tcs.by_layer]
        if missing:
            raise SteerscopeError(f"an attribution graph needs a transcoder for every layer; missing {missing}")
        self.model, self.tcs, self.tokens = model, tcs, tokens
        self.L, self.T = model.cfg.n_layers, tokens.shape[0]
        self.first = 1 if has_bos(model) else 0
        names = [n for n in model.hook_dict if n.endswith(("hook_scale", "attn.hook_pattern"))]
        self.frozen_names = names
        grab = names + [f"blocks.{L}.ln2.hook_normalized" for L in range(self.L)] + \
            [f"blocks.{L}.hook_mlp_out" for L in range(self.L)]
        cache: dict[str, Tensor] = {}

        def keep(name):
            def fn(t, hook):
                cache[name] = t.detach()
            return fn

        dt = next(model.parameters()).dtype
        with torch.no_grad(), hooks(model, [(n, keep(n)) for n in grab]):
            self.logits = model(tokens[None].to(model.cfg.device))[0, -1].to(dt)
        self.cache = cache
        feats, acts, self.base_full, self.base_zero, self.errors = [], [], {}, {}, {}
        with torch.no_grad():
            for L in range(self.L):
                tc = _like(tcs[L], model.cfg.device, dt)  # a cast copy when needed: the caller's stay as they are
                x, mlp = cache[f"blocks.{L}.ln2.hook_normalized"][0], cache[f"blocks.{L}.hook_mlp_out"][0]
                codes = tc.encode(x)
                recon = tc.predict(x, codes)
                skip = tc.skip(x)
                err = mlp - recon
                err[: self.first] = 0
                codes[: self.first] = 0
                self.errors[L] = err
                full, zero = mlp.clone(), mlp.clone()
                if skip is not None:
                    full[self.first:] -= skip[self.first:]
                zero[self.first:] = tc.b_dec
                self.base_full[L], self.base_zero[L] = full, zero
                pos, f = codes.nonzero(as_tuple=True)
                feats.append(torch.stack([torch.full_like(pos, L), pos, f], 1))
                acts.append(codes[pos, f])
        self.features = torch.cat(feats)
        self.activations = torch.cat(acts)
        self.embed = model.W_E[tokens.to(model.cfg.device)].detach()

    def run(self, B: int, objective: Callable[[dict[str, Tensor], Tensor], Tensor], zero_sources: bool = False,
            stop: int | None = None):
        """Frozen affine forward on B copies of the prompt; ``objective(live, rows)`` gives [B] values. With
        ``stop`` the forward ends before block ``stop`` (enough when every target is a feature of a lower layer).

        Returns (values [B], {"embed": grad [B, T, d], L: grad at hook_mlp_out [B, T, d]}).
        """
        model, first = self.model, self.first
        dev = model.cfg.device
        dt = self.embed.dtype
        leaves = {L: torch.zeros(B, self.T, model.cfg.d_model, device=dev, dtype=dt, requires_grad=True) for L in range(self.L)}
        leaves["embed"] = torch.zeros(B, self.T, model.cfg.d_model, device=dev, dtype=dt, requires_grad=True)
        live: dict[str, Tensor] = {}

        def frozen(name):
            def fn(t, hook):
                return self.cache[name].expand_as(t)
            return fn

        def embed(t, hook):
            return leaves["embed"] + (0 * t if zero_sources else t.detach())

        def grab(name):
            def fn(t, hook):
                live[name] = t
            return fn

        def mlp_out(L):
            base = (self.base_zero if zero_sources else self.base_full)[L]
            W_skip = getattr(self.tcs[L], "W_skip", None)

            def fn(t, hook):
                out = base.expand_as(t) + leaves[L]
                if W_skip is not None:
                    s = live[f"blocks.{L}.ln2.hook_normalized"] @ W_skip.to(dt)
                    s = torch.cat([torch.zeros_like(s[:, :first]), s[:, first:]], 1)
                    out = out + s
                return out
            return fn

        fwd = [(n, frozen(n)) for n in self.frozen_names] + [("hook_embed", embed)]
        fwd += [(f"blocks.{L}.ln2.hook_normalized", grab(f"blocks.{L}.ln2.hook_normalized")) for L in range(self.L)]
        fwd += [(f"blocks.{L}.hook_mlp_out", mlp_out(L)) for L in range(self.L)]
        fwd += [("ln_final.hook_normalized", grab("ln_final.hook_normalized"))]
        with hooks(model, fwd), _no_weight_grads(model, *self.tcs.by_layer.values()):
            batch = self.tokens[None].expand(B, -1).to(dev)
            if stop is None:
                model(batch, return_type=None)
            else:
                model(batch, stop_at_layer=stop)
            values = objective(live, torch.arange(B, device=dev))
            values.sum().backward()
        return values.detach(), {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in leaves.items()}

    def sources(self) -> tuple[list[tuple[int, Tensor, Tensor]], Tensor, Tensor]:
        """What each source contributes: per layer (layer, feature rows, their a_s W_dec[s]), errors, embeddings."""
        out = []
        for L in range(self.L):
            idx = (self.features[:, 0] == L).nonzero()[:, 0]
            W = self.tcs[L].W_dec.detach().to(self.embed.dtype)
            out.append((L, idx, self.activations[idx, None] * W[self.features[idx, 2]]))
        return out, torch.stack([self.errors[L] for L in range(self.L)]), self.embed

    def edges(self, grads: dict, n_nodes: int) -> Tensor:
        """[B, N] direct effects of every node on each of the B targets, from one backward pass's gradients."""
        B = grads["embed"].shape[0]
        F = len(self.features)
        A = torch.zeros(B, n_nodes, dtype=self.embed.dtype, device=self.embed.device)
        per_layer, errors, embed = self.sources()
        for L, idx, vecs in per_layer:
            if len(idx):
                g = grads[L][:, self.features[idx, 1]]  # [B, n, d]
                A[:, idx] = (g * vecs[None]).sum(-1)
        for L in range(self.L):
            A[:, F + L * self.T: F + (L + 1) * self.T] = (grads[L] * errors[L][None]).sum(-1)
        A[:, F + self.L * self.T: F + self.L * self.T + self.T] = (grads["embed"] * embed[None]).sum(-1)
        return A


def _like(module, device, dtype):
    w = next(module.parameters())
    return module if (w.device, w.dtype) == (torch.device(device), dtype) else copy.deepcopy(module).to(device, dtype)


@contextmanager
def _no_weight_grads(*modules):
    """Only the leaves need gradients: with the weights' ``requires_grad`` off, backward skips every weight
    gradient (about a third of its work); the flags are restored afterwards."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


def targets(rep: Replacement, graph_nodes: list[int], n_features: int, logit_ids: Tensor, W_Ud: Tensor):
    """objective(live, rows) for a batch of target nodes (features by index, logits after them)."""
    enc = {}

    def objective(live, rows):
        vals = []
        for b, n in enumerate(graph_nodes):
            if n < n_features:
                L, p, f = (int(v) for v in rep.features[n])
                if L not in enc:
                    enc[L] = rep.tcs[L].W_enc.detach().to(rep.embed.dtype)
                vals.append(live[f"blocks.{L}.ln2.hook_normalized"][b, p] @ enc[L][:, f])
            else:
                k = n - (rep.L * rep.T + rep.T + n_features)
                vals.append(live["ln_final.hook_normalized"][b, -1] @ W_Ud[:, int(logit_ids[k])])
        return torch.stack(vals)
    return objective
