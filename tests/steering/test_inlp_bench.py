"""bench/inlp.py: the speech/narration labels, the sink-spared projection, and the whole run on a tiny model."""

from __future__ import annotations

import json
import random

import pytest
import torch

from bench.inlp import (
    NARRATION,
    QUOTE,
    SPEECH,
    UNLABELLED,
    char_states,
    contexts,
    greedy_spared,
    lm_loss,
    logits_of,
    main,
    person_rate,
    projected,
    random_projection,
    run,
    speech_share,
    token_labels,
)
from steering.inlp import INLP, Projection

SITE = "blocks.1.hook_resid_post"
NARRATIVE = "the house was quiet and she walked slowly to the garden where he waited by the old gate".split()
SPOKEN = "I am sure you are right my dear but we cannot go now indeed I do not know".split()


def texts(seed: int, n: int) -> list[str]:
    """Paragraphs of narration with a quoted speech inside (one chapter-like document)."""
    rng = random.Random(seed)

    def words(pool, k):
        return " ".join(rng.choice(pool) for _ in range(k))

    paras = [f'{words(NARRATIVE, 8).capitalize()}. "{words(SPOKEN, 7).capitalize()}," said she. {words(NARRATIVE, 6)}.'
             for _ in range(n)]
    return ["\n\n".join(paras)]


def test_char_states_toggle_curly_quotes_and_newline_reset():
    text = 'He said, "Yes." Then \u201cno\u201d.\n"Open\nshut'
    got = "".join("S" if s else "." for s in char_states(text))
    assert got == "..........SSSS........SS.." + "." + ".SSSS" + "." + "...."


def test_token_labels_by_first_non_space_character():
    text = 'He said, "Yes," then "no'
    offsets = [(0, 2), (2, 7), (7, 8), (8, 10), (10, 13), (13, 15), (15, 20), (20, 21), (21, 22), (22, 24), (24, 24)]
    # He | said | , | ' "' | Yes | ,"  | then | ' ' | " | no | (empty)
    assert token_labels(text, offsets) == [NARRATION, NARRATION, NARRATION, QUOTE, SPEECH, QUOTE, NARRATION,
                                           UNLABELLED, QUOTE, SPEECH, UNLABELLED]


def test_contexts_start_with_the_context_token_and_do_not_overlap(tiny_dense):
    ctxs = list(contexts(tiny_dense, texts(0, 30), 16, None))
    assert len(ctxs) >= 5
    start = tiny_dense.tokenizer.bos_token_id
    for tok, lab in ctxs:
        assert tok.shape == lab.shape == (16,)
        assert int(tok[0]) == start and int(lab[0]) == UNLABELLED
    assert {int(x) for _, lab in ctxs for x in lab} <= {NARRATION, SPEECH, QUOTE, UNLABELLED}
    assert any((lab == SPEECH).any() for _, lab in ctxs) and any((lab == NARRATION).any() for _, lab in ctxs)
    shuffled = list(contexts(tiny_dense, texts(0, 30), 16, seed=3))
    assert sorted(t.tolist() for t, _ in shuffled) == sorted(t.tolist() for t, _ in ctxs)  # same contexts, reordered


def test_speech_share_carries_the_prompt_quote_state(tiny_dense):
    s, n = speech_share('She said, "', 'Yes, indeed." Then she left.', tiny_dense.tokenizer)
    assert n >= 5 and 2 <= s < n  # "Yes , indeed" are speech, "Then she left ." narration
    assert speech_share("The house", " was quiet.", tiny_dense.tokenizer)[0] == 0


def test_identity_projection_leaves_the_loss_exactly(tiny_dense):
    ctxs = list(contexts(tiny_dense, texts(1, 30), 16, None))[:4]
    tokens, labels = torch.stack([c[0] for c in ctxs]), torch.stack([c[1] for c in ctxs])
    identity = Projection(SITE, torch.eye(64), torch.randn(64))
    base = lm_loss(tiny_dense, None, tokens, labels, 2)
    for spare in (False, True):
        got = lm_loss(tiny_dense, None, tokens, labels, 2, identity, spare)
        torch.testing.assert_close(torch.tensor(list(got.values())), torch.tensor(list(base.values())),
                                   atol=1e-5, rtol=0, equal_nan=True)


def test_sparing_the_first_position_keeps_its_logits(tiny_dense):
    torch.manual_seed(0)
    tokens = torch.stack([c[0] for c in list(contexts(tiny_dense, texts(2, 20), 16, None))[:2]])
    erasure = INLP(torch.linalg.qr(torch.randn(64, 8))[0].T.contiguous(), torch.randn(64) * 3)
    proj = erasure.at(SITE)
    with torch.no_grad():
        base = logits_of(tiny_dense, None, tokens)
        with projected(tiny_dense, None, proj, spare_first=True):
            spared = logits_of(tiny_dense, None, tokens)
        with projected(tiny_dense, None, proj, spare_first=False):
            everywhere = logits_of(tiny_dense, None, tokens)
    torch.testing.assert_close(spared[:, 0], base[:, 0], atol=1e-5, rtol=0)
    assert (spared[:, 1:] - base[:, 1:]).abs().max() > 1e-3
    assert (everywhere[:, 0] - base[:, 0]).abs().max() > 1e-3


def test_greedy_loop_matches_generate_when_nothing_is_spared(noisy_tiny_dense):
    from steering.apply import generate

    torch.manual_seed(1)
    # blocks.0: what the sink holds after the last block reaches no other position
    proj = INLP(torch.linalg.qr(torch.randn(64, 6))[0].T.contiguous(), torch.randn(64)).at("blocks.0.hook_resid_post")
    prompts = ['She said, "', "The house was quiet and"]
    for steer in (None, proj):
        want = generate(noisy_tiny_dense, prompts, steer=[steer] if steer else [], mode="all", max_new_tokens=6)
        assert greedy_spared(noisy_tiny_dense, None, prompts, steer, 6, spare_first=False) == want
    assert greedy_spared(noisy_tiny_dense, None, prompts, proj, 6) != want  # sparing the sink is a change


def test_person_rate_counts_first_and_second_person_words():
    assert person_rate("I'm sure you are right, my dear. She left.", {"i'm", "you", "my"}) == (3, 9)
    assert person_rate("", {"i"}) == (0, 0)


def test_random_projection_is_orthogonal_of_the_same_rank():
    erasure = INLP(torch.linalg.qr(torch.randn(32, 5, dtype=torch.float64))[0].T.float().contiguous(), torch.zeros(32))
    r = random_projection(erasure, SITE, seed=7)
    torch.testing.assert_close(r.P @ r.P, r.P, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.P, r.P.T, atol=1e-6, rtol=0)
    assert round(float(torch.trace(r.P))) == 32 - 5
    torch.testing.assert_close(random_projection(erasure, SITE, seed=7).P, r.P, atol=0, rtol=0)


def test_run_at_tiny_size(tiny_dense):
    prompts = {"speech": ['She said, "'], "narration": ["The house was"]}
    res = run(tiny_dense, SITE, rows=64, test_rows=32, per_context=4, n_ctx=16, n_iter=3, loss_tokens=60,
              n_random=2, new_tokens=4, batch_size=4, train_texts=texts(0, 60), test_texts=texts(1, 40),
              prompts=prompts)
    json.dumps(res)  # one JSON object
    assert res["site"] == SITE and res["weights"] == "as loaded"
    assert res["data"]["train_rows"] == 64 and res["data"]["test_rows"] == 32  # balanced: half of each class
    inlp = res["inlp"]
    assert 1 <= len(inlp["dev_accuracy_by_iteration"]) <= 3 and inlp["majority_baseline"] == 0.5
    assert inlp["rank_removed"] <= 3
    for arm in ("raw", "inlp", "random"):
        assert set(res["heldout_probe_accuracy"][arm]) == {"logistic", "mlp"}
    kept = res["variance_kept"]
    assert 0 < kept["inlp"] <= 1 and len(kept["random"]) == 2 and all(0 < k <= 1 for k in kept["random"])
    loss = res["lm_loss_nats"]
    assert loss["contexts"] == 4 and loss["predictions"] == 4 * 14
    for variant in ("all_positions", "sink_spared"):
        assert len(loss[variant]["random"]) == 2
        assert loss[variant]["delta_inlp"]["all"] == pytest.approx(loss[variant]["inlp"]["all"] - loss["none"]["all"],
                                                                   abs=2e-4)
    assert set(res["generation"]) == {"none", "inlp", "inlp_sink_spared", "random", "random_sink_spared"}
    for gen in res["generation"].values():
        assert [t["group"] for t in gen["texts"]] == ["speech", "narration"]
        for v in (*gen["speech_share"].values(), *gen["person_rate"].values()):
            assert v is None or 0 <= v <= 1
    assert set(res["times_s"]) == {"load", "activations", "inlp_fit", "fresh_probes", "lm_loss", "generation", "total"}


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "speech" in out and "--rows" in out and "--n-random" in out
