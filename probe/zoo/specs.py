"""Architectures and training settings of the bundled models (one dict each, no magic)."""

from __future__ import annotations

VOCAB_SIZE = 8192
N_CTX = 256
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>"]

_COMMON = dict(
    n_layers=4,
    d_model=256,
    n_heads=8,
    d_head=32,
    n_ctx=N_CTX,
    d_vocab=VOCAB_SIZE,
    positional_embedding_type="rotary",
    default_prepend_bos=True,
    original_architecture="steerscope-zoo",
    seed=0,
)

MODEL_SPECS: dict[str, dict] = {
    "austen-dense": dict(
        _COMMON,
        model_name="austen-dense",
        d_mlp=1024,
        act_fn="gelu_new",
        normalization_type="LN",
    ),
    "austen-moe": dict(
        _COMMON,
        model_name="austen-moe",
        d_mlp=256,  # per expert; 8 experts, top-2, gated SiLU (Mixtral-style)
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        num_experts=8,
        experts_per_token=2,
        norm_topk_prob=True,
    ),
}

TRAIN_DEFAULTS = dict(
    batch_size=16,
    lr=2e-3,
    min_lr_frac=0.1,
    warmup_steps=40,
    weight_decay=0.1,
    grad_clip=1.0,
    aux_loss_coef=0.01,  # MoE load balancing (Switch Transformer style)
    eval_every=50,
    eval_contexts=64,
    seed=0,
)

PROMPTS = [
    "It is a truth universally acknowledged",
    "Mr. Darcy",
    "She walked into the room",
    "My dear Emma,",
    "The weather at Bath",
]
