"""bench/codebook.py end to end on a tiny zoo model: the code tables and the concept code against brute-force
recounts, and the steering rows' zero-coefficient identity."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from bench.codebook import code_table, concept_code, run, split_contexts
from bench.inlp import NARRATION, SPEECH
from probe.errors import SteerscopeError
from probe.models import load_model
from saes.codebook import code_ids
from steering.compare import AUSTEN_CONCEPTS
from steering.effects import token_id


@pytest.fixture(scope="module")
def result(tiny_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("cbbench") / "model"
    res = run(out, reuse=False, n_codes=32, k=2, n_tokens=8 * 256 * 2, control=False, contexts=6, concept="family",
              coeffs=[0.0, 4.0], samples=1, seed=0, base=str(tiny_zoo), eval_contexts=2, n_prompts=2, new_tokens=6,
              progress=False)
    return out, res


def test_the_code_table_matches_a_brute_force_recount(result):
    out, res = result
    m = load_model(str(out))
    tokens, labels = split_contexts(m, 6)
    table = code_table(m, tokens, labels)
    assert table == {k: v for k, v in res["codes_on_test_contexts"].items() if k.startswith("blocks.")}
    for site, ids in code_ids(m, tokens).items():
        fires, per_tok, speech, labelled = Counter(), {}, Counter(), Counter()
        for i in range(tokens.shape[0]):
            for t in range(1, tokens.shape[1]):
                for c in ids[i, t].tolist():
                    fires[c] += 1
                    per_tok.setdefault(c, Counter())[int(tokens[i, t])] += 1
                    if int(labels[i, t]) in (SPEECH, NARRATION):
                        labelled[c] += 1
                        speech[c] += int(labels[i, t]) == SPEECH
        assert table[site]["live_codes"] == len(fires)
        tok_codes = [c for c in fires if fires[c] >= 10 and max(per_tok[c].values()) / fires[c] >= 0.9]
        assert table[site]["token_codes"] == len(tok_codes)
        sp = [c for c in fires if labelled[c] >= 10 and speech[c] / labelled[c] >= 0.95]
        assert table[site]["speech_codes"] == len(sp)
        for row in table[site]["examples"]["token"]:
            assert row["fires"] == fires[row["code"]]


def test_the_concept_code_has_the_best_precision_on_val(result):
    out, res = result
    m = load_model(str(out))
    words = AUSTEN_CONCEPTS["family"]
    pick = concept_code(m, words, 6)
    assert res["steering"]["chosen"] == {k: v for k, v in pick.items() if k != "live"}
    tokens, _ = split_contexts(m, 6, split="val")
    wid = {token_id(m, " " + w) for w in words}
    best = 0.0
    for site, ids in code_ids(m, tokens).items():
        hits, fires = Counter(), Counter()
        for i in range(tokens.shape[0]):
            for t in range(tokens.shape[1] - 1):
                for c in ids[i, t].tolist():
                    fires[c] += 1
                    hits[c] += int(tokens[i, t + 1]) in wid
        prec = {c: hits[c] / fires[c] for c in fires if fires[c] >= 10}
        best = max(best, max(prec.values(), default=0.0))
        if site == pick["site"]:
            assert prec.get(pick["code"], 0.0) == pytest.approx(pick["precision"], abs=1e-4)
    assert pick["precision"] == pytest.approx(best, abs=1e-4)


def test_steering_rows_at_coefficient_zero_are_the_unsteered_model(result):
    _, res = result
    st = res["steering"]
    assert st["concept_code"]["code"] == st["chosen"]["code"] != st["random_code"]["code"]
    for name in ("concept_code", "random_code"):
        zero = st[name]["rows"][0]
        assert zero["times_code"] == 0.0 and zero["topic_words"] == zero["baseline_words"]
        assert zero["kl"] == pytest.approx(0.0, abs=1e-5) and zero["ppl_ratio"] == pytest.approx(1.0, abs=1e-4)
        assert st[name]["rows"][1]["kl"] > 1e-4  # 4 code-norms added everywhere moves the next-token distribution
    assert torch.isfinite(torch.tensor(res["fine_tune"]["test"]["loss_codebook_model"]))


def test_bad_inputs_get_one_clear_line(result, tmp_path):
    out, _ = result
    with pytest.raises(SteerscopeError, match="unknown concept 'nope'"):
        run(out, True, 32, 2, 0, False, 2, "nope", [0.0], 1, 0)
    with pytest.raises(SteerscopeError, match="no finished codebook fine-tune"):
        run(tmp_path, True, 32, 2, 0, False, 2, "family", [0.0], 1, 0)
