"""Controller-weighted steering (Hegazy et al., "Guiding Giants: Lightweight Controllers for Weighted Activation
Steering in LLMs").

A direction per layer (``layer_directions``: the difference of means of ``hook_resid_post`` at the prompt's
last token between *target* prompts, e.g. requests to refuse, and *benign* ones) is added during generation
at every layer, scaled per prompt by a small network that reads one intermediate activation of that prompt::

    patch_l = alpha * s(x) * w_l(x) * d_l          (x: the read site's activation at the prompt's last token)

``s`` is a global scale (a linear output, trained towards 1 on target prompts and 0 on benign ones with a mean
squared error, as the paper does) and ``w_l = sigmoid(.)`` per-layer weights in (0, 1), shaped only through
the shared hidden layer (the paper supervises ``s`` alone). The claim to test is selectivity: steer the target
prompts as a constant coefficient would, and leave the benign ones alone. :meth:`Controller.vectors_for`
turns a prompt into ordinary :class:`~steering.vectors.SteeringVector` s, so ``generate(..., steer=...)`` and
``steerscope steer`` apply them like any other; ``bench/controller.py`` measures it on SmolLM2-Instruct.

The paper builds one direction from output-embedding averages of refusal and answer phrases; here, as the
issue asks, each layer has its own difference of means.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from probe.errors import SteerscopeError
from probe.sites import resolve_one
from probe.twin import twin_of
from steering.apply import last_token_logits, left_pad
from steering.vectors import SteeringVector

SITE = "blocks.{L}.hook_resid_post"


@torch.no_grad()
def last_token_states(model, prompts: Sequence[str], sites: Sequence[str], chat: bool = False,
                      batch_size: int = 16) -> dict[str, Tensor]:
    """site -> [n, d]: each site's activation at each prompt's last token (on the twin when there is one)."""
    if isinstance(prompts, str) or not len(prompts):
        raise SteerscopeError("give a non-empty list of prompts")
    names = [resolve_one(model, s) for s in sites]
    twin = twin_of(model, names)
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    for i in range(0, len(prompts), batch_size):
        tokens, mask, _ = left_pad(model, list(prompts[i: i + batch_size]), chat)
        got: dict[str, Tensor] = {}

        def keep(name, got=got):
            def fn(t, hook):
                got[name] = t[:, -1].detach().float().cpu()  # left-padded: the last column is every row's last token
            return fn

        last_token_logits(model, tokens, mask, [(n, keep(n)) for n in names], twin)
        for n in names:
            out[n].append(got[n])
    return {n: torch.cat(v) for n, v in out.items()}


def layer_directions(model, target: Sequence[str], benign: Sequence[str], chat: bool = False) -> Tensor:
    """[n_layers, d_model]: per layer, mean(target) - mean(benign) of ``hook_resid_post`` at the last token."""
    if min(len(target), len(benign)) < 1:
        raise SteerscopeError(f"need target and benign prompts, got {len(target)} and {len(benign)}")
    sites = [SITE.format(L=L) for L in range(model.cfg.n_layers)]
    a, b = last_token_states(model, target, sites, chat), last_token_states(model, benign, sites, chat)
    return torch.stack([a[s].mean(0) - b[s].mean(0) for s in sites])


class Controller(nn.Module):
    """The controller network and the per-layer directions it weights (see the module docstring)."""

    def __init__(self, directions: Tensor, read_layer: int, alpha: float = 1.0, hidden: int = 256,
                 model_name: str | None = None):
        super().__init__()
        directions = torch.as_tensor(directions).float()
        if directions.ndim != 2:
            raise SteerscopeError(f"directions must be [n_layers, d_model], got shape {tuple(directions.shape)}")
        L, d = directions.shape
        if not 0 <= read_layer < L:
            raise SteerscopeError(f"read_layer must be a layer in [0, {L}), got {read_layer}")
        self.read_layer, self.alpha, self.model_name = read_layer, float(alpha), model_name
        self.register_buffer("directions", directions)
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1 + L))

    @property
    def read_site(self) -> str:
        return SITE.format(L=self.read_layer)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(s [B], w [B, n_layers]) from read-site activations ``x`` [B, d]."""
        out = self.net((x.float() - self.mean) / self.std)
        return out[:, 0], torch.sigmoid(out[:, 1:])

    @classmethod
    def fit(cls, model, target: Sequence[str], benign: Sequence[str], read_layer: int | None = None,
            alpha: float = 1.0, directions: Tensor | None = None, hidden: int = 256, epochs: int = 300,
            lr: float = 1e-3, chat: bool = False, seed: int = 0) -> Controller:
        """Directions from the two prompt sets (unless given), then the network: full-batch Adam on the read
        site's last-token activations, ``s`` regressed on 1 (target) and 0 (benign). Default read layer: two
        thirds of the way up (the paper reads the last third)."""
        L = model.cfg.n_layers
        read_layer = (2 * L) // 3 if read_layer is None else read_layer
        if directions is None:
            directions = layer_directions(model, target, benign, chat)
        torch.manual_seed(seed)
        ctl = cls(directions, read_layer, alpha, hidden, model.cfg.model_name)
        ctl.check_model(model)
        site = ctl.read_site
        x = torch.cat([last_token_states(model, target, [site], chat)[site],
                       last_token_states(model, benign, [site], chat)[site]])
        y = torch.cat([torch.ones(len(target)), torch.zeros(len(benign))])
        ctl.mean.copy_(x.mean(0))
        ctl.std.copy_(x.std(0).clamp_min(1e-6))
        opt = torch.optim.Adam(ctl.net.parameters(), lr=lr)
        for _ in range(epochs):
            s, _ = ctl(x)
            loss = ((s - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        ctl.train_loss = float(loss.detach())
        return ctl.eval()

    def check_model(self, model) -> None:
        L, d = self.directions.shape
        if (model.cfg.n_layers, model.cfg.d_model) != (L, d):
            raise SteerscopeError(f"this controller is for a model with {L} layers of width {d} "
                                  f"({self.model_name or 'unnamed'}); {model.cfg.model_name} has {model.cfg.n_layers} "
                                  f"of width {model.cfg.d_model}")
        if self.model_name not in (None, model.cfg.model_name):
            raise SteerscopeError(f"this controller was trained on {self.model_name!r}, not {model.cfg.model_name!r}")

    @torch.no_grad()
    def weights_for(self, model, prompts: Sequence[str], chat: bool = False) -> tuple[Tensor, Tensor]:
        """(s [n], w [n, n_layers]) for each prompt."""
        self.check_model(model)
        x = last_token_states(model, prompts, [self.read_site], chat)[self.read_site]
        return self(x)

    def vectors_for(self, model, prompt: str, chat: bool = False) -> list[SteeringVector]:
        """The steering vectors for ``prompt``: ``alpha * s * w_l * d_l`` at every layer's ``hook_resid_post``
        (apply them with mode "all": the paper patches every position, prompt and generated)."""
        s, w = self.weights_for(model, [prompt], chat)
        prov = {"method": "controller", "s": float(s[0]), "alpha": self.alpha}
        return [SteeringVector(SITE.format(L=L), self.directions[L], self.alpha * float(s[0]) * float(w[0, L]), prov)
                for L in range(len(self.directions))]

    # ---- artifacts
    def save(self, path: str | Path) -> Path:
        """A directory: ``controller.json`` and ``controller.safetensors``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        hidden = self.net[0].out_features
        meta = {"kind": "controller", "read_layer": self.read_layer, "alpha": self.alpha, "hidden": hidden,
                "model": self.model_name}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "controller.safetensors"))
        (path / "controller.json").write_text(json.dumps(meta, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Controller:
        path = Path(path)
        try:
            meta = json.loads((path / "controller.json").read_text())
            state = load_file(str(path / "controller.safetensors"))
            if meta.get("kind") != "controller":
                raise KeyError("kind")
            ctl = cls(state["directions"], meta["read_layer"], meta["alpha"], meta["hidden"], meta.get("model"))
            ctl.load_state_dict(state)
        except (OSError, KeyError, ValueError, RuntimeError, SafetensorError, json.JSONDecodeError) as e:
            raise SteerscopeError(f"{path} is not a saved controller ({type(e).__name__}: {e})") from None
        return ctl.eval()
