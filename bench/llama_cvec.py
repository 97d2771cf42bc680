"""Does a control vector exported by steerscope steer llama.cpp exactly as it steers steerscope?

1. Writes an F32 GGUF of SmolLM2-135M-Instruct: every tensor of the packaged Q4_1 file dequantized with
   ``gguf``, the metadata copied, so llama.cpp computes with the weights steerscope loads (the Q4_1 file
   itself runs llama.cpp's quantized kernels: correlation about 0.86, not a test of the export).
2. Builds a mean-difference vector at ``blocks.L.hook_resid_post`` and exports it with
   ``SteeringVector.to_gguf`` (``direction.L``).
3. Loads that file as llama.cpp's own loader does (``direction.k`` at offset ``n_embd * (k - 1)`` of one
   buffer, every tensor summed) and applies it with ``llama_set_adapter_cvec`` through llama-cpp-python.
4. For each prompt, the next-token log-prob shift (steered minus unsteered, over the unsteered top
   ``--top`` tokens) in llama.cpp vs in steerscope at the exported site, and at the sites one layer off.

    pip install -e ".[bench]"         # llama-cpp-python builds from its sdist (~5-8 minutes on 2 cores)
    python -m bench.llama_cvec --layer 12 --coeff 4

Prints one JSON object: the Pearson correlation of the shifts at the exported layer and one layer off.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = ["The capital of France is", "My favourite thing to do on a rainy day is", "I went up to my friend and said",
           "The best way to learn a new language is", "Once upon a time, in a small village,",
           "The weather today is", "She opened the letter and", "Scientists have discovered that",
           "The most important meal of the day is", "He looked at the sky and thought about",
           "In my opinion, the movie was", "The recipe calls for two cups of"]
POSITIVE = ["I love this, it makes me so happy.", "What a wonderful, joyful day.", "I adore my friends and family."]
NEGATIVE = ["I hate this, it makes me so angry.", "What a terrible, miserable day.", "I despise my enemies."]


def write_f32_gguf(src: Path, dst: Path) -> Path:
    """Every tensor of ``src`` dequantized to float32, the metadata copied; written to ``dst``."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        shape = [int(n) for n in reversed(t.shape.tolist())]
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def load_cvec(path: Path, n_embd: int, n_layer: int, strength: float = 1.0) -> np.ndarray:
    """A control-vector file the way llama.cpp's loader reads it: one buffer, layer k at n_embd * (k - 1)."""
    import gguf

    buf = np.zeros(n_embd * n_layer, dtype=np.float32)
    for t in gguf.GGUFReader(path).tensors:
        k = int(t.name.split(".", 1)[1])
        if k < 1:
            raise ValueError(f"{path}: llama.cpp rejects direction.{k}")
        buf[n_embd * (k - 1): n_embd * k] += np.asarray(t.data, dtype=np.float32) * strength
    return buf


def llama_shifts(gguf_path: Path, cvec: np.ndarray, prompts: list[list[int]], n_embd: int, n_layer: int) -> list[np.ndarray]:
    """Next-token log-probs (unsteered, steered) in llama.cpp for each tokenized prompt."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), n_ctx=128, n_threads=2, n_gpu_layers=0, logits_all=True, verbose=False)

    def logprobs(ids):
        llm.reset()
        llm.eval(ids)
        x = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        return x - np.log(np.exp(x - x.max()).sum()) - x.max()

    base = [logprobs(ids) for ids in prompts]
    ptr = cvec.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, ptr, len(cvec), n_embd, 1, n_layer) != 0:
        raise RuntimeError("llama_set_adapter_cvec failed")
    steered = [logprobs(ids) for ids in prompts]
    llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, None, 0, n_embd, 1, n_layer)
    return [(b, s) for b, s in zip(base, steered, strict=True)]


def ours(model, v, prompts: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    from steering.apply import steer

    out = []
    for ids in prompts:
        t = torch.tensor([ids])
        with torch.no_grad():
            base = model(t)[0, -1].double().log_softmax(-1).numpy()
            with steer(model, [v], mode="all"):
                steered = model(t)[0, -1].double().log_softmax(-1).numpy()
        out.append((base, steered))
    return out


def correlation(a: list[tuple[np.ndarray, np.ndarray]], b: list[tuple[np.ndarray, np.ndarray]], top: int) -> float:
    """Pearson correlation of the log-prob shifts over each prompt's unsteered top tokens, pooled."""
    xs, ys = [], []
    for (ab, as_), (bb, bs) in zip(a, b, strict=True):
        idx = np.argsort(-ab)[:top]
        xs.append(as_[idx] - ab[idx])
        ys.append(bs[idx] - bb[idx])
    return float(np.corrcoef(np.concatenate(xs), np.concatenate(ys))[0, 1])


def run(layer: int = 12, coeff: float = 4.0, n_prompts: int = 12, top: int = 50, work: Path | None = None) -> dict:
    from probe.gguf import cache_dir, file_sha256, packaged_path
    from probe.models import load_model
    from probe.tokens import encode
    from steering import SteeringVector

    t0 = time.time()
    src = packaged_path("smollm2-135m-instruct")
    work = Path(work) if work else cache_dir() / "gguf-f32"
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / f"{file_sha256(src)[:16]}-f32.gguf"
    if not f32.is_file():
        write_f32_gguf(src, f32.with_suffix(".tmp"))
        f32.with_suffix(".tmp").rename(f32)
    model = load_model("smollm2-135m-instruct")
    n_layer, n_embd = model.cfg.n_layers, model.cfg.d_model
    site = f"blocks.{layer}.hook_resid_post"
    v = SteeringVector.mean_diff(model, POSITIVE, NEGATIVE, site).with_coeff(coeff)
    cv = v.to_gguf(work / f"cvec-{layer}.gguf", n_layers=n_layer)
    prompts = [list(map(int, encode(model, p))) for p in PROMPTS[:n_prompts]]
    theirs = llama_shifts(f32, load_cvec(cv, n_embd, n_layer), prompts, n_embd, n_layer)
    res = {"model": "SmolLM2-135M-Instruct (Q4_1 dequantized to F32)", "exported": f"direction.{layer}", "site": site,
           "coeff": coeff, "vector_norm": float(v.scaled().norm()), "n_prompts": len(prompts), "top_tokens": top,
           "corr_same_layer": correlation(theirs, ours(model, v, prompts), top)}
    for off in (-1, 1):
        other = SteeringVector(f"blocks.{layer + off}.hook_resid_post", v.tensor, v.coeff)
        res[f"corr_layer_{off:+d}"] = correlation(theirs, ours(model, other, prompts), top)
    res["wall_s"] = round(time.time() - t0, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=12, help="export blocks.L.hook_resid_post as direction.L")
    ap.add_argument("--coeff", type=float, default=4.0, help="coefficient of the mean-difference vector")
    ap.add_argument("--prompts", type=int, default=12, help=f"prompts (at most {len(PROMPTS)})")
    ap.add_argument("--top", type=int, default=50, help="tokens per prompt (the unsteered top ones)")
    ap.add_argument("--work", type=Path, default=None, help="where the F32 GGUF goes (default: the cache directory)")
    a = ap.parse_args()
    print(json.dumps(run(a.layer, a.coeff, a.prompts, a.top, a.work), indent=2))


if __name__ == "__main__":
    main()
