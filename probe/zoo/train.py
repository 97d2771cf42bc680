"""Train the bundled tokenizer and models from scratch on the Austen corpus.

``steerscope zoo train austen-dense`` (or ``python -m probe.zoo.train austen-dense``) writes
``probe/zoo/<name>/{config.json, model.safetensors, tokenizer.json, card.json}``.
The checkpoint with the best validation loss is kept; the card records how it was made.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from probe.corpus import load_corpus, pack
from probe.zoo import ZOO_DIR
from probe.zoo.specs import MODEL_SPECS, N_CTX, PROMPTS, SPECIAL_TOKENS, TRAIN_DEFAULTS, VOCAB_SIZE

TOKENIZER_FILE = ZOO_DIR / "tokenizer.json"


def train_tokenizer(out: Path = TOKENIZER_FILE, vocab_size: int = VOCAB_SIZE) -> Path:
    """Byte-level BPE on the train split (deterministic for a given corpus)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(load_corpus("austen", "train"), trainer=trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out


def load_tokens(split: str, tokenizer_file: Path = TOKENIZER_FILE) -> torch.Tensor:
    from tokenizers import Tokenizer

    return pack(Tokenizer.from_file(str(tokenizer_file)), load_corpus("austen", split), N_CTX)


def bigram_val_loss(train: torch.Tensor, val: torch.Tensor, vocab: int = VOCAB_SIZE, alpha: float = 0.01) -> float:
    """Add-alpha bigram model fit on train contexts, scored on the same (prev, next) pairs as the LM."""
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    counts.index_add_(0, (train[:, :-1] * vocab + train[:, 1:]).reshape(-1), torch.ones(train[:, 1:].numel(), dtype=torch.float64))
    counts = counts.view(vocab, vocab) + alpha
    logp = counts.log() - counts.sum(1, keepdim=True).log()
    return float(-logp[val[:, :-1].reshape(-1), val[:, 1:].reshape(-1)].mean())


def moe_hook_names(cfg) -> list[str]:
    return [f"blocks.{i}.mlp.hook_expert_weights" for i in range(cfg.n_layers)]


def lm_loss(model, tokens: torch.Tensor, aux_coef: float = 0.0):
    """Next-token loss, plus Switch-style load balancing E * sum_e f_e P_e when the model is MoE."""
    if not model.cfg.num_experts:
        return model(tokens, return_type="loss"), 0.0
    probs: list[torch.Tensor] = []
    hooks = [(n, lambda t, hook: probs.append(t)) for n in moe_hook_names(model.cfg)]
    loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=hooks)
    E, k = model.cfg.num_experts, model.cfg.experts_per_token
    aux = 0.0
    for p in probs:
        top = p.topk(k, dim=-1).indices
        frac = torch.zeros(E, device=p.device).index_add_(0, top.reshape(-1), torch.ones(top.numel(), device=p.device))
        aux = aux + E * (frac / top.numel() * p.mean(0)).sum()
    aux = aux / len(probs)
    return loss + aux_coef * aux, float(aux.detach())


@torch.no_grad()
def evaluate_loss(model, tokens: torch.Tensor, batch_size: int = 16) -> float:
    total, n = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        b = tokens[i : i + batch_size].to(model.cfg.device)
        total += float(model(b, return_type="loss")) * b.shape[0]
        n += b.shape[0]
    return total / n


@torch.no_grad()
def expert_loads(model, tokens: torch.Tensor, batch_size: int = 16) -> list[list[float]]:
    """Share of routed (token, slot) assignments per expert, per layer."""
    if not model.cfg.num_experts:
        return []
    E = model.cfg.num_experts
    counts = torch.zeros(model.cfg.n_layers, E)
    names = [f"blocks.{i}.mlp.hook_expert_indices" for i in range(model.cfg.n_layers)]
    for i in range(0, len(tokens), batch_size):
        _, cache = model.run_with_cache(tokens[i : i + batch_size].to(model.cfg.device), names_filter=names)
        for layer, n in enumerate(names):
            counts[layer] += torch.bincount(cache[n].reshape(-1).cpu(), minlength=E).float()
    return (counts / counts.sum(1, keepdim=True)).tolist()


@torch.no_grad()
def continuations(model, prompts=PROMPTS, n_tokens: int = 30, seed: int = 0) -> list[dict]:
    out = []
    for p in prompts:
        greedy = model.generate(p, max_new_tokens=n_tokens, do_sample=False, verbose=False)
        torch.manual_seed(seed)
        sampled = model.generate(p, max_new_tokens=n_tokens, do_sample=True, temperature=0.8, top_k=50, verbose=False)
        out.append({"prompt": p, "greedy": greedy, "sampled": sampled})
    return out


def lr_at(step: int, total: int, warmup: int, lr: float, min_frac: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_model(name: str, n_tokens: int, out_dir: Path | None = None, device: str = "cpu", **overrides) -> dict:
    """Train zoo model ``name`` on ``n_tokens`` tokens; write its directory; return its card."""
    from probe.models import build_model, load_zoo_weights, save_zoo_weights

    hp = {**TRAIN_DEFAULTS, **overrides}
    out_dir = out_dir or ZOO_DIR / name
    if not TOKENIZER_FILE.exists():
        train_tokenizer()
    train, val = load_tokens("train"), load_tokens("val")
    torch.manual_seed(hp["seed"])
    model = build_model(MODEL_SPECS[name], TOKENIZER_FILE, device=device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=hp["lr"], betas=(0.9, 0.95))
    steps = max(1, n_tokens // (hp["batch_size"] * N_CTX))
    gen = torch.Generator().manual_seed(hp["seed"])
    order, pos = torch.randperm(len(train), generator=gen), 0
    eval_set = val[: hp["eval_contexts"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    best, history, t0 = float("inf"), [], time.time()
    bar = tqdm(range(steps), desc=f"train {name}", unit="step")
    for step in bar:
        if pos + hp["batch_size"] > len(order):
            order, pos = torch.randperm(len(train), generator=gen), 0
        batch = train[order[pos : pos + hp["batch_size"]]].to(device)
        pos += hp["batch_size"]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, hp["warmup_steps"], hp["lr"], hp["min_lr_frac"])
        loss, aux = lm_loss(model, batch, hp["aux_loss_coef"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
        opt.step()
        if (step + 1) % hp["eval_every"] == 0 or step == steps - 1:
            model.eval()
            v = evaluate_loss(model, eval_set)
            model.train()
            history.append({"step": step + 1, "tokens": (step + 1) * hp["batch_size"] * N_CTX, "train_loss": float(loss), "val_loss_subset": v})
            if v < best:
                best = v
                save_zoo_weights(model, out_dir / "model.safetensors")
            bar.set_postfix(loss=f"{float(loss):.3f}", val=f"{v:.3f}", best=f"{best:.3f}", aux=f"{aux:.3f}")
    wall = time.time() - t0
    # reload the kept (best, fp16) weights so every number on the card is what users load
    (out_dir / "config.json").write_text(json.dumps(MODEL_SPECS[name], indent=2))
    shutil.copy(TOKENIZER_FILE, out_dir / "tokenizer.json")
    model = build_model(MODEL_SPECS[name], TOKENIZER_FILE, device=device)
    load_zoo_weights(model, out_dir / "model.safetensors")
    model.eval()
    card = {
        "name": name,
        "architecture": MODEL_SPECS[name],
        "n_params": sum(p.numel() for p in model.parameters()),
        "data": "austen train split (Debian r-cran-janeaustenr, chapters, 18/20 train)",
        "train_tokens_available": int(train.numel()),
        "tokens_seen": steps * hp["batch_size"] * N_CTX,
        "steps": steps,
        "hyperparameters": hp,
        "hardware": f"{platform.processor() or platform.machine()} / {device} / torch {torch.__version__} / {torch.get_num_threads()} threads",
        "wall_time_s": round(wall, 1),
        "val_loss": evaluate_loss(model, val),
        "val_loss_subset": evaluate_loss(model, val[:32]),
        "val_subset": "first 32 contexts of the packed val split (n_ctx 256, BOS first)",
        "bigram_val_loss": bigram_val_loss(train, val),
        "expert_loads": expert_loads(model, val),
        "history": history,
        "samples": continuations(model),
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2))
    return card


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("name", choices=sorted(MODEL_SPECS))
    ap.add_argument("--tokens", type=int, default=3_000_000)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    c = train_model(a.name, a.tokens, device=a.device)
    print(json.dumps({k: c[k] for k in ("val_loss", "bigram_val_loss", "tokens_seen", "wall_time_s")}))
