"""The catalogue of bad inputs: every command, every kind of file. Each row runs the real ``steerscope`` entry point
(``app.cli.main``) and checks: exit status 2, one line on stderr that starts with ``error:`` and contains the
expected fragment, and nothing written (the workspace's files, sizes and mtimes unchanged). Add rows; never
remove them."""

from __future__ import annotations

import json
import sys

import pytest
import torch

W = "{W}"  # the workspace directory, filled in per run

CASES = [
    # ---- zoo, corpus
    ("zoo-info-unknown", ["zoo", "info", "austen-dens"], "austen-dense"),
    ("zoo-train-unknown", ["zoo", "train", "gpt7", "--tokens", "1000"], "gpt7"),
    ("corpus-unknown", ["corpus", "info", "austin"], "unknown corpus"),
    ("corpus-missing-file", ["corpus", "info", f"{W}/nope.txt"], "no file matches"),
    ("corpus-binary", ["corpus", "info", f"{W}/bin.txt"], "binary file"),
    ("corpus-latin1", ["corpus", "info", f"{W}/latin1.txt"], "not valid UTF-8"),
    ("corpus-bad-jsonl", ["corpus", "info", f"{W}/bad.jsonl"], "'text' field"),
    ("corpus-hf-offline", ["corpus", "info", "hf:nobody/nothing"], "offline"),
    ("corpus-hf-a-file", ["corpus", "info", f"hf:{W}/afile"], "offline"),
    ("corpus-hf-not-a-dataset", ["corpus", "info", f"hf:{W}/sae"], "cannot load dataset"),
    # ---- cache
    ("cache-bad-site", ["cache", "build", f"{W}/new", "--site", "blocks.2.hook_resid_pots", "--corpus", f"{W}/long.txt",
                        "--n-tokens", "50"], "Did you mean"),
    ("cache-layer-out-of-range", ["cache", "build", f"{W}/new", "--site", "blocks.9.hook_resid_post", "--corpus",
                                  f"{W}/long.txt", "--n-tokens", "50"], "layers"),
    ("cache-too-many-tokens", ["cache", "build", f"{W}/new", "--site", "blocks.2.hook_resid_post", "--corpus",
                               f"{W}/long.txt", "--n-tokens", "100000000"], "more than the corpus provides"),
    ("cache-zero-tokens", ["cache", "build", f"{W}/new", "--site", "blocks.2.hook_resid_post", "--corpus",
                           f"{W}/long.txt", "--n-tokens", "0"], "n_tokens"),
    ("cache-bad-dtype", ["cache", "build", f"{W}/new", "--site", "blocks.2.hook_resid_post", "--corpus",
                         f"{W}/long.txt", "--n-tokens", "50", "--dtype", "float8"], "dtype"),
    ("cache-unknown-model", ["cache", "build", f"{W}/new", "--model", "austen-dens", "--n-tokens", "50"], "austen-dense"),
    ("cache-into-a-file", ["cache", "build", f"{W}/afile", "--site", "blocks.2.hook_resid_post", "--corpus",
                           f"{W}/long.txt", "--n-tokens", "50"], "is a file"),
    ("cache-under-a-file", ["cache", "build", f"{W}/afile/sub", "--site", "blocks.2.hook_resid_post", "--corpus",
                            f"{W}/long.txt", "--n-tokens", "50"], "a file is in the way"),
    ("cache-into-foreign-dir", ["cache", "build", f"{W}/sae", "--site", "blocks.2.hook_resid_post", "--corpus",
                                f"{W}/long.txt", "--n-tokens", "50"], "not an activation store"),
    ("cache-into-other-store", ["cache", "build", f"{W}/acts", "--site", "blocks.1.hook_resid_post", "--corpus",
                                f"{W}/long.txt", "--n-tokens", "50"], "holds a different activation store"),
    ("cache-bad-device", ["cache", "build", f"{W}/new", "--site", "blocks.2.hook_resid_post", "--corpus",
                          f"{W}/long.txt", "--n-tokens", "50", "--device", "tpu"], "device"),
    ("cache-cuda-on-cpu", ["cache", "build", f"{W}/new", "--site", "blocks.2.hook_resid_post", "--corpus",
                           f"{W}/long.txt", "--n-tokens", "50", "--device", "cuda"], "no CUDA"),
    ("cache-gguf-missing", ["cache", "build", f"{W}/new", "--model", f"{W}/nope.gguf", "--n-tokens", "50"],
     "no such GGUF file"),
    ("cache-gguf-not-gguf", ["cache", "build", f"{W}/new", "--model", f"{W}/text.gguf", "--n-tokens", "50"],
     "not a GGUF file"),
    ("cache-gguf-truncated", ["cache", "build", f"{W}/new", "--model", f"{W}/cut.gguf", "--n-tokens", "50"],
     "truncated"),
    ("cache-gguf-architecture", ["cache", "build", f"{W}/new", "--model", f"{W}/odd.gguf", "--n-tokens", "50"],
     "architecture notallama"),
    ("cache-info-missing", ["cache", "info", f"{W}/nope"], "nope"),
    ("cache-info-not-a-store", ["cache", "info", f"{W}/sae"], "activation store"),
    ("cache-verify-missing", ["cache", "verify", f"{W}/nope"], "nope"),
    ("cache-verify-a-file", ["cache", "verify", f"{W}/afile"], "afile"),
    # ---- train
    ("train-no-store", ["train", "-a", "topk", "--d-sae", "16", "--out", f"{W}/t"], "train needs store"),
    ("train-no-out", ["train", "--store", f"{W}/acts", "-a", "topk", "--d-sae", "16"], "out"),
    ("train-unknown-arch", ["train", "--store", f"{W}/acts", "-a", "topkk", "--site", "blocks.2.hook_resid_post", "--d-sae", "16", "--out", f"{W}/t"],
     "Did you mean"),
    ("train-bad-site", ["train", "--store", f"{W}/acts", "-a", "topk", "--site", "blocks.2.hook_resid_pots", "--d-sae",
                        "16", "--k", "4", "--out", f"{W}/t"], "blocks.2.hook_resid_post"),
    ("train-missing-store", ["train", "--store", f"{W}/nope", "-a", "topk", "--d-sae", "16", "--out", f"{W}/t"], "nope"),
    ("train-zero-dsae", ["train", "--store", f"{W}/acts", "-a", "topk", "--d-sae", "0", "--k", "4", "--out", f"{W}/t"],
     "d_sae"),
    ("train-k-too-big", ["train", "--store", f"{W}/acts", "-a", "topk", "--d-sae", "8", "--k", "16", "--out", f"{W}/t"], "k"),
    ("train-bad-decay", ["train", "--store", f"{W}/acts", "-a", "topk", "--d-sae", "16", "--k", "4", "--decay", "cosin",
                         "--out", f"{W}/t"], "cosine"),
    ("train-bad-bdec", ["train", "--store", f"{W}/acts", "-a", "topk", "--d-sae", "16", "--k", "4", "--b-dec-init",
                        "median", "--out", f"{W}/t"], "b_dec_init"),
    ("train-negative-lr", ["train", "--store", f"{W}/acts", "-a", "topk", "--d-sae", "16", "--k", "4", "--lr", "-1",
                           "--out", f"{W}/t"], "lr"),
    ("train-zero-batch", ["train", "--store", f"{W}/acts", "-a", "topk", "--d-sae", "16", "--k", "4", "--batch-size", "0",
                          "--out", f"{W}/t"], "batch_size"),
    ("train-cuda-on-cpu", ["train", "--store", f"{W}/acts", "-a", "topk", "--d-sae", "16", "--k", "4", "--device", "cuda",
                           "--out", f"{W}/t"], "no CUDA"),
    ("train-bad-set", ["train", "--store", f"{W}/acts", "-a", "topk", "--d-sae", "16", "--k", "4", "--set", "nokey",
                       "--out", f"{W}/t"], "KEY=VALUE"),
    ("train-unknown-option", ["train", "--store", f"{W}/acts", "-a", "relu", "--site", "blocks.2.hook_resid_post", "--d-sae", "16", "--set", "l1_cof=1",
                              "--out", f"{W}/t"], "l1_coeff"),
    ("train-config-missing", ["train", "--config", f"{W}/nope.json"], "does not exist"),
    ("train-config-binary", ["train", "--config", f"{W}/bin.txt"], "binary file"),
    ("train-config-latin1", ["train", "--config", f"{W}/latin1.txt"], "not valid UTF-8"),
    ("train-config-bad-json", ["train", "--config", f"{W}/bad.json"], "cannot parse"),
    ("train-config-list", ["train", "--config", f"{W}/list.json"], "mapping"),
    ("train-config-bad-yaml", ["train", "--config", f"{W}/bad.yaml"], "cannot parse"),
    ("train-transcoder-no-target", ["train", "--store", f"{W}/acts", "-a", "transcoder", "--site", "blocks.2.hook_resid_post", "--d-sae", "16", "--k", "4",
                                    "--out", f"{W}/t"], "target"),
    ("train-over-dictionary", ["train", "--store", f"{W}/acts", "-a", "topk", "--site", "blocks.2.hook_resid_post",
                               "--d-sae", "16", "--k", "4", "--out", f"{W}/sae"], "already holds a dictionary"),
    ("train-into-store", ["train", "--store", f"{W}/acts", "-a", "topk", "--site", "blocks.2.hook_resid_post",
                          "--d-sae", "16", "--k", "4", "--out", f"{W}/acts"], "holds an activation store"),
    ("train-negative-checkpoint-minutes", ["train", "--store", f"{W}/acts", "-a", "topk", "--site",
                                           "blocks.2.hook_resid_post", "--d-sae", "16", "--k", "4",
                                           "--checkpoint-minutes", "-1", "--out", f"{W}/t"], "checkpoint_minutes"),
    ("train-snmf-by-gradient", ["train", "--store", f"{W}/acts", "-a", "snmf", "--site", "blocks.2.hook_resid_post", "--d-sae", "16", "--out", f"{W}/t"],
     "snmf"),
    # ---- snmf
    ("snmf-missing-store", ["snmf", f"{W}/nope", "--site", "blocks.2.hook_resid_post", "--out", f"{W}/s"], "nope"),
    ("snmf-bad-site", ["snmf", f"{W}/acts", "--site", "blocks.2.mlp.hook_pots", "--out", f"{W}/s"], "site"),
    ("snmf-rank-too-big", ["snmf", f"{W}/acts", "--site", "blocks.2.hook_resid_post", "--rank", "100000", "--out",
                           f"{W}/s"], "rank"),
    ("snmf-bad-sparsity", ["snmf", f"{W}/acts", "--site", "blocks.2.hook_resid_post", "--sparsity", "1.5", "--out",
                           f"{W}/s"], "sparsity"),
    ("snmf-bad-init", ["snmf", f"{W}/acts", "--site", "blocks.2.hook_resid_post", "--init", "kmean", "--out", f"{W}/s"],
     "init"),
    # ---- eval
    ("eval-missing-dir", ["eval", f"{W}/nope"], "not a dictionary directory"),
    ("eval-not-a-dictionary", ["eval", f"{W}/acts"], "not a dictionary directory"),
    ("eval-zero-contexts", ["eval", f"{W}/sae", "--corpus", f"{W}/long.txt", "--n-contexts", "0"], "n_contexts"),
    ("eval-ctx-too-long", ["eval", f"{W}/sae", "--corpus", f"{W}/long.txt", "--n-ctx", "300"], "n_ctx"),
    ("eval-bad-ablation", ["eval", f"{W}/sae", "--corpus", f"{W}/long.txt", "--ablation", "mea"], "ablation"),
    ("eval-bad-site", ["eval", f"{W}/sae", "--corpus", f"{W}/long.txt", "--site", "blocks.2.hook_resid_pots"],
     "Did you mean"),
    ("eval-wrong-width-site", ["eval", f"{W}/sae", "--corpus", f"{W}/long.txt", "--site", "blocks.2.mlp.hook_post"],
     "width"),
    ("eval-binary-corpus", ["eval", f"{W}/sae", "--corpus", f"{W}/bin.txt"], "binary file"),
    ("eval-cfg-list", ["eval", f"{W}/sae_list"], "JSON object"),
    ("eval-cfg-binary", ["eval", f"{W}/sae_binary"], "not valid JSON"),
    ("eval-cfg-future", ["eval", f"{W}/sae_future"], "format_version 99"),
    ("eval-weights-flipped", ["eval", f"{W}/sae_flipped"], "sha256"),
    ("eval-weights-truncated", ["eval", f"{W}/sae_truncated"], "corrupted or truncated"),
    ("eval-unknown-arch", ["eval", f"{W}/sae_arch"], "unknown architecture"),
    ("eval-unknown-model", ["eval", f"{W}/sae", "--model", "austen-dens"], "austen-dense"),
    # ---- features, app
    ("features-missing-dir", ["features", f"{W}/nope", "--out", f"{W}/f"], "not a dictionary directory"),
    ("features-into-store", ["features", f"{W}/sae", "--corpus", f"{W}/long.txt", "--out", f"{W}/acts"],
     "holds an activation store"),
    ("features-into-dictionary", ["features", f"{W}/sae", "--corpus", f"{W}/long.txt", "--out", f"{W}/sae"],
     "holds a dictionary"),
    ("features-zero-tokens", ["features", f"{W}/sae", "--corpus", f"{W}/long.txt", "--n-tokens", "0", "--out",
                              f"{W}/f"], "n_tokens"),
    ("features-zero-examples", ["features", f"{W}/sae", "--corpus", f"{W}/long.txt", "--n-examples", "0", "--out",
                                f"{W}/f"], "n_examples"),
    ("features-binary-corpus", ["features", f"{W}/sae", "--corpus", f"{W}/bin.txt", "--out", f"{W}/f"], "binary file"),
    ("features-bad-device", ["features", f"{W}/sae", "--corpus", f"{W}/long.txt", "--device", "cuda", "--out",
                             f"{W}/f"], "no CUDA"),
    ("app-missing-store", ["app", "--store", f"{W}/nope"], "does not exist"),
    ("app-not-a-store", ["app", "--store", f"{W}/acts"], "not a finished feature store"),
    # ---- steer
    ("steer-no-vector", ["steer", "She walked"], "give --add and --sub"),
    ("steer-empty-prompt", ["steer", "  ", "--add", "Love", "--sub", "Hate"], "prompt"),
    ("steer-bad-layer", ["steer", "She walked", "--add", "Love", "--sub", "Hate", "--layer", "9"], "layer"),
    ("steer-bad-mode", ["steer", "She walked", "--add", "Love", "--sub", "Hate", "--mode", "both"], "mode"),
    ("steer-huge-coeff", ["steer", "She walked", "--add", "Love", "--sub", "Hate", "--coeff", "1e38"], "smaller coeff"),
    ("steer-inf-coeff", ["steer", "She walked", "--add", "Love", "--sub", "Hate", "--coeff", "inf"], "finite"),
    ("steer-save-onto-file", ["steer", "She walked", "--add", "Love", "--sub", "Hate", "--save", f"{W}/afile",
                              "--max-new-tokens", "2"], "is a file"),
    ("steer-vector-missing", ["steer", "She walked", "--vector", f"{W}/nope"], "nope"),
    ("steer-chat-no-template", ["steer", "She walked", "--add", "Love", "--sub", "Hate", "--layer", "0", "--chat"],
     "no chat template"),
    ("steer-vector-not-a-vector", ["steer", "She walked", "--vector", f"{W}/sae"], "vector.json"),
    ("steer-prompts-binary", ["steer", "She walked", "--add", "Love", "--sub", "Hate", "--sweep", "0,4", "--words",
                              "love", "--prompts", f"{W}/bin.txt"], "binary file"),
    ("steer-prompts-latin1", ["steer", "She walked", "--add", "Love", "--sub", "Hate", "--sweep", "0,4", "--words",
                              "love", "--prompts", f"{W}/latin1.txt"], "not valid UTF-8"),
    ("steer-prompts-empty", ["steer", "She walked", "--add", "Love", "--sub", "Hate", "--sweep", "0,4", "--words",
                             "love", "--prompts", f"{W}/empty.txt"], "no prompts"),
    ("steer-prompts-missing", ["steer", "She walked", "--add", "Love", "--sub", "Hate", "--sweep", "0,4", "--words",
                               "love", "--prompts", f"{W}/nope.txt"], "does not exist"),
    ("steer-bad-sweep", ["steer", "She walked", "--add", "Love", "--sub", "Hate", "--sweep", "0,x", "--words", "love"],
     "sweep"),
    ("steer-sweep-no-words", ["steer", "She walked", "--add", "Love", "--sub", "Hate", "--sweep", "0,4"], "words"),
    ("steer-unknown-model", ["steer", "She walked", "--add", "Love", "--sub", "Hate", "--model", "austen-dens"],
     "austen-dense"),
    # ---- experts
    ("experts-dense-model", ["experts", f"{W}/prompts.txt", f"{W}/prompts2.txt", "--model", "austen-dense"], "expert"),
    ("experts-missing-file", ["experts", f"{W}/nope.txt", f"{W}/prompts.txt"], "does not exist"),
    ("experts-binary", ["experts", f"{W}/bin.txt", f"{W}/prompts.txt"], "binary file"),
    ("experts-latin1", ["experts", f"{W}/prompts.txt", f"{W}/latin1.txt"], "not valid UTF-8"),
    ("experts-empty", ["experts", f"{W}/empty.txt", f"{W}/prompts.txt"], "no prompts"),
    ("experts-bad-top", ["experts", f"{W}/prompts.txt", f"{W}/prompts2.txt", "--top", "0"], "top"),
    ("experts-bad-by", ["experts", f"{W}/prompts.txt", f"{W}/prompts2.txt", "--by", "weights"], "weight"),
    # ---- patch
    ("patch-no-prompts", ["patch", "--good", " she", "--bad", " he"], "BASE"),
    ("patch-two-token-answer", ["patch", "Mr. Darcy came in and", "Mrs. Darcy came in and", "--good", " she said",
                                "--bad", " he"], "single token"),
    ("patch-empty-answer", ["patch", "Mr. Darcy came in and", "Mrs. Darcy came in and", "--good", "", "--bad", " he"],
     "token"),
    ("patch-pairs-and-prompts", ["patch", "a", "b", "--pairs", f"{W}/pairs.tsv", "--good", " she", "--bad", " he"],
     "not both"),
    ("patch-pairs-missing", ["patch", "--pairs", f"{W}/nope.tsv", "--good", " she", "--bad", " he"], "does not exist"),
    ("patch-pairs-binary", ["patch", "--pairs", f"{W}/bin.txt", "--good", " she", "--bad", " he"], "binary file"),
    ("patch-pairs-latin1", ["patch", "--pairs", f"{W}/latin1.txt", "--good", " she", "--bad", " he"], "UTF-8"),
    ("patch-pairs-one-column", ["patch", "--pairs", f"{W}/bad_pairs.tsv", "--good", " she", "--bad", " he"],
     "base<TAB>source"),
    ("patch-bad-site", ["patch", "Mr. Darcy came in and", "Mrs. Darcy came in and", "--good", " she", "--bad", " he",
                        "--site", "blocks.1.hook_resid_pots"], "Did you mean"),
    ("patch-direction-missing", ["patch", "Mr. Darcy came in and", "Mrs. Darcy came in and", "--good", " she", "--bad",
                                 " he", "--direction", f"{W}/nope"], "nope"),
    # ---- compare
    ("compare-missing-dictionary", ["compare", f"{W}/nope"], "not a dictionary directory"),
    ("compare-bad-concept", ["compare", f"{W}/sae", "--concept", "family"], "name: word"),
    ("compare-bad-kl", ["compare", f"{W}/sae", "--kl", "-1"], "kl"),
    # ---- transcoders, attribute
    ("transcoders-bad-layer", ["transcoders", "--out", f"{W}/tc", "--layers", "9", "--corpus", f"{W}/long.txt",
                               "--n-tokens", "512", "--d-sae", "16"], "layers must be"),
    ("transcoders-too-many-tokens", ["transcoders", "--out", f"{W}/tc", "--corpus", f"{W}/long.txt", "--n-tokens",
                                     "100000000", "--d-sae", "16"], "more than the corpus"),
    ("transcoders-into-a-file", ["transcoders", "--out", f"{W}/afile", "--corpus", f"{W}/long.txt", "--n-tokens",
                                 "512", "--d-sae", "16"], "is a file"),
    ("attribute-not-transcoders", ["attribute", "Mr. Darcy", "--transcoders", f"{W}/sae", "--out", f"{W}/g.json"],
     "load_dictionary"),
    ("attribute-damaged-index", ["attribute", "Mr. Darcy", "--transcoders", f"{W}/tc_bad", "--out", f"{W}/g.json"],
     "damaged"),
    ("attribute-missing", ["attribute", "Mr. Darcy", "--transcoders", f"{W}/nope", "--out", f"{W}/g.json"],
     "not a transcoders directory"),
    # ---- demo
    ("demo-unknown-model", ["demo", "--out", f"{W}/d", "--model", "austen-dens", "--no-serve"], "austen-dense"),
    ("demo-bad-site", ["demo", "--out", f"{W}/d", "--site", "blocks.2.hook_resid_pots", "--no-serve"], "Did you mean"),
]


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from probe.models import load_model
    from probe.store import ActivationStore
    from saes.topk import TopKConfig, TopKSAE

    w = tmp_path_factory.mktemp("bad_inputs")
    (w / "bin.txt").write_bytes(b"\x00\x01\x02binary\x00")
    (w / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (w / "empty.txt").write_text("\n  \n")
    (w / "afile").write_text("just a file")
    (w / "tc_bad").mkdir()
    (w / "tc_bad" / "transcoders.json").write_text("{not json")
    (w / "bad.jsonl").write_text('{"txt": "no text key"}\n')
    (w / "bad.json").write_text("{not json")
    (w / "bad.yaml").write_text("a: [unclosed")
    (w / "list.json").write_text("[1, 2, 3]")
    (w / "pairs.tsv").write_text("Mr. Darcy came in and\tMrs. Darcy came in and\n")
    (w / "bad_pairs.tsv").write_text("only one column here\n")
    (w / "prompts.txt").write_text("She walked into the room\nHe said nothing\n")
    (w / "prompts2.txt").write_text("The carriage arrived\nThe estate lies north\n")
    long = " ".join(["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                     "must be in want of a wife."] * 40)
    (w / "long.txt").write_text(long)
    from tests.probe.tiny_gguf import write_tiny_llama

    (w / "text.gguf").write_text("not a model")
    write_tiny_llama(w / "odd.gguf", architecture="notallama", n_layers=1)
    write_tiny_llama(w / "cut.gguf", n_layers=1)
    (w / "cut.gguf").write_bytes((w / "cut.gguf").read_bytes()[:5000])
    model = load_model("austen-dense", device="cpu")
    ActivationStore.build(model, str(w / "long.txt"), "blocks.2.hook_resid_post", 200, w / "acts", n_ctx=64,
                          progress=False)
    ActivationStore.build(model, str(w / "long.txt"), "blocks.1.hook_resid_post", 200, w / "acts_l1", n_ctx=64,
                          progress=False)
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=256, d_sae=32, k=4, site="blocks.2.hook_resid_post", model="austen-dense"))
    for name in ("sae", "sae_list", "sae_binary", "sae_future", "sae_flipped", "sae_truncated", "sae_arch"):
        sae.save(w / name)
    (w / "sae_list" / "cfg.json").write_text("[1, 2]")
    (w / "sae_binary" / "cfg.json").write_bytes(b"\xff\xfe\x00\x01")
    cfg = json.loads((w / "sae" / "cfg.json").read_text())
    (w / "sae_future" / "cfg.json").write_text(json.dumps({**cfg, "format_version": 99}))
    (w / "sae_arch" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "wavelet"}))
    f = w / "sae_flipped" / "weights.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    f = w / "sae_truncated" / "weights.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return w


@pytest.mark.parametrize("args, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(workspace, args, fragment, capsys, monkeypatch):
    from app.cli import main

    before = snapshot(workspace)
    monkeypatch.setattr(sys, "argv", ["steerscope", *(a.replace(W, str(workspace)) for a in args)])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert fragment.lower() in err[0].lower(), err[0]
    assert snapshot(workspace) == before


def test_the_catalogue_only_grows():
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)
