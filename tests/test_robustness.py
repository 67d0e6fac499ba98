"""Perturbations (roc_jax.robustness), per-sample evaluation and explanations (roc_jax.explain),
other description sets, and eval.py --perturbation / --explain on the tiny trained model."""

import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from roc_testutil import REPO

import roc_jax
from roc_jax import explain, robustness
from roc_jax.data.records import Entity, Sample
from roc_jax.labels import descriptions as desc_lib


def _sample(tokens, head, tail, head_type="person", tail_type="location", image="x.jpg", i=0):
    tokens = tuple(tokens.split())
    return Sample(tokens, Entity(" ".join(tokens[slice(*head)]), head, type=head_type),
                  Entity(" ".join(tokens[slice(*tail)]), tail, type=tail_type),
                  "/per/loc/place_of_residence", f"{i}.jpg", image, f"val.txt:{i + 1}")


SAMPLES = [
    _sample("RT @news : Rafael Nadal lives in sunny Mallorca with his family", (3, 5), (7, 9)),
    _sample("Paris is where Emma Watson spends the summer #travel", (3, 5), (0, 1), i=1),
    _sample("Barack Obama greets Michelle Obama at the White House tonight", (0, 2), (3, 5),
            tail_type="person", image=None, i=2),
    # A nested pair (the tail inside the head): names cannot be replaced independently.
    _sample("New York City marathon results are out", (0, 3), (0, 2), "location", i=3),
]
TRAIN = [
    _sample("Serena Williams moved to Palm Beach last year", (0, 2), (4, 6)),
    _sample("Lionel Messi returns to Rosario", (0, 2), (4, 5)),
    _sample("Tom Hanks lives in Los Angeles", (0, 2), (4, 6)),
    _sample("London and Dublin and Tokyo", (0, 1), (2, 3), "location"),
]


def _span_text(s, e):
    return " ".join(s.tokens[e.span[0]:e.span[1]])


def test_name_pool_groups_distinct_names_by_type():
    pool = robustness.name_pool(TRAIN)
    assert pool["person"] == [("Serena", "Williams"), ("Lionel", "Messi"), ("Tom", "Hanks")]
    assert ("London",) in pool["location"] and ("Palm", "Beach") in pool["location"]


def test_substitute_names_recomputes_spans_and_keeps_context_and_types():
    pool = robustness.name_pool(TRAIN)
    out = robustness.substitute_names(SAMPLES, pool, seed=3)
    for before, after in zip(SAMPLES[:3], out[:3], strict=True):
        for old, new in ((before.head, after.head), (before.tail, after.tail)):
            assert _span_text(after, new) == new.name  # the span spells the new name
            assert tuple(new.name.split()) in pool[old.type] and new.name != old.name
            assert new.type == old.type
        # The context tokens are the same, in the same order, around the new names.
        inside = lambda s: {i for e in (s.head, s.tail) for i in range(*e.span)}  # noqa: E731
        assert [t for i, t in enumerate(before.tokens) if i not in inside(before)] == \
            [t for i, t in enumerate(after.tokens) if i not in inside(after)]
        assert after.relation == before.relation and after.image_path == before.image_path
    # Head after tail in the sentence (sample 1): both spans still right.
    assert out[1].tail.span[0] == 0 and out[1].head.span[0] > out[1].tail.span[1] - 1
    assert out[3] == SAMPLES[3]  # the nested pair is left as it is
    assert robustness.count_changed(SAMPLES, out) == 3
    assert out == robustness.substitute_names(SAMPLES, pool, seed=3)  # deterministic
    assert out != robustness.substitute_names(SAMPLES, pool, seed=4)


def test_substitute_names_without_another_name_of_the_type_is_an_error():
    with pytest.raises(ValueError, match="no other name of type 'person'"):
        robustness.substitute_names(SAMPLES[:1], {"person": [("Rafael", "Nadal")],
                                                  "location": [("Paris",)]}, seed=0)


def test_typos_touch_only_context_words_at_about_the_rate():
    many = SAMPLES * 200
    out = robustness.add_typos(many, 0.3, seed=0)
    touched = eligible = 0
    for before, after in zip(many, out, strict=True):
        assert len(after.tokens) == len(before.tokens)
        assert (after.head, after.tail) == (before.head, before.tail)
        ok = set(robustness.typo_eligible(before))
        for i, (a, b) in enumerate(zip(before.tokens, after.tokens, strict=True)):
            if a != b:
                assert i in ok, (a, b)  # never an entity token, a handle, a tag, a short word
                assert abs(len(a) - len(b)) <= 1
        touched += sum(a != b for a, b in zip(before.tokens, after.tokens, strict=True))
        eligible += len(ok)
        for e in (after.head, after.tail):
            assert _span_text(after, e) == e.name
    assert 0.25 < touched / eligible < 0.35
    assert robustness.add_typos(many, 0.3, seed=0) == out
    assert robustness.add_typos(many, 0.0, seed=0) == many
    assert "@news" not in {t for i in robustness.typo_eligible(SAMPLES[0])
                           for t in [SAMPLES[0].tokens[i]]}


def test_shuffled_types_are_a_permutation_and_untyped_empties_them():
    types = lambda ss: [t for s in ss for t in (s.head.type, s.tail.type)]  # noqa: E731
    out = robustness.shuffle_types(SAMPLES * 10, seed=1)
    assert collections.Counter(types(out)) == collections.Counter(types(SAMPLES * 10))
    assert types(out) != types(SAMPLES * 10)
    assert [s.tokens for s in out] == [s.tokens for s in SAMPLES * 10]
    assert out == robustness.shuffle_types(SAMPLES * 10, seed=1)
    assert set(types(robustness.untype(SAMPLES))) == {""}


def test_remove_images_and_perturb_by_name():
    out = robustness.perturb("no_images", SAMPLES)
    assert all(s.image_path is None for s in out)
    assert robustness.count_changed(SAMPLES, out) == 3  # sample 2 had no image
    with pytest.raises(ValueError, match="needs the training samples"):
        robustness.perturb("entity_names", SAMPLES)
    with pytest.raises(ValueError, match="unknown perturbation 'blur'"):
        robustness.perturb("blur", SAMPLES)
    for name in robustness.PERTURBATIONS:
        robustness.perturb(name, SAMPLES[:3], seed=0, train_samples=TRAIN)
    assert SAMPLES[0].tokens[3:5] == ("Rafael", "Nadal")  # the input is never changed


def test_variant_names_are_distinct():
    names = {robustness.variant_name(p, 0) for p in robustness.PERTURBATIONS}
    names |= {robustness.variant_name(None, 0, "d/mnre_paraphrase.json"),
              robustness.variant_name(None, 0, None, 1), robustness.variant_name("untyped", 1)}
    assert len(names) == len(robustness.PERTURBATIONS) + 2  # untyped has no seed
    assert robustness.variant_name() == ""
    assert robustness.variant_name("typos_low", 2) == "typos_low_s2"


# ---------------------------------------------------------------------------------------------
# The shipped paraphrase set

PARAPHRASE = REPO / "roc_jax" / "labels" / "data" / "mnre_descriptions_paraphrase.json"


def test_paraphrase_set_is_complete_reviewed_and_independent():
    from test_descriptions import MNRE_LABELS

    para = desc_lib.load_descriptions(PARAPHRASE, MNRE_LABELS)
    shipped = desc_lib.load_descriptions(None, MNRE_LABELS)
    dfile = desc_lib.read_descriptions_file(PARAPHRASE)
    for key in ("written_by", "prompt", "review", "encoder_check"):
        assert dfile.meta.get(key), key
    for name in MNRE_LABELS:
        texts = para[name]
        assert len(texts) == 5 and len(set(texts)) == 5, name
        assert dfile.relations[name].review, name
        for t in texts:
            assert "head" in t.lower() and "tail" in t.lower(), (name, t)
            assert t not in shipped[name], (name, t)
        # Written apart, not edited: no sentence shares more than half its words (Jaccard) with
        # any shipped description of the relation.
        for t in texts:
            for u in shipped[name]:
                a, b = (set(re.findall(r"[a-z']+", x.lower())) for x in (t, u))
                assert len(a & b) / len(a | b) < 0.55, (t, u)


# ---------------------------------------------------------------------------------------------
# On the tiny trained model


@pytest.fixture(scope="module")
def loaded(trained):
    return roc_jax.load(trained[0])


def test_clean_per_sample_eval_matches_evaluate_split(loaded):
    ev, info = robustness.evaluate_variant(loaded, "val")
    ref = loaded.evaluate_split("val")
    assert info == {"split": "val", "perturbation": "clean", "samples": 16, "changed": 0}
    loaded.config.seed = 3  # the model's seed, not the perturbation's, names the run
    ev_typo, info_typo = robustness.evaluate_variant(loaded, "val", "typos_low", seed=5)
    entry = robustness.run_entry(loaded, "w", "typos_low", ev_typo, info_typo, 1.0)
    assert (entry["seed"], entry["perturbation_seed"], entry["head"]) == (3, 5, "roc")
    for key in ("f1", "precision", "recall", "accuracy", "confusion"):
        assert ev.metrics[key] == ref[key], key
    assert ev.logits.shape == (16, len(loaded.label_names))
    assert ev.prototypes.shape == (len(loaded.label_names), ev.pairs.shape[1])
    np.testing.assert_allclose(np.linalg.norm(ev.prototypes, axis=-1), 1.0, rtol=1e-5)


def test_explain_rows_agree_with_predict(loaded):
    ev, _ = robustness.evaluate_variant(loaded, "val")
    rows = explain.explain_rows(ev)
    samples = robustness.read_split(loaded.config, "val")
    assert [r["id"] for r in rows] == [s.source for s in samples]
    for r, s in list(zip(rows, samples, strict=True))[:3]:
        top = loaded.predict(list(s.tokens), head=s.head.span, tail=s.tail.span, top_k=2)
        assert r["predicted"] == top[0]["relation"] and r["runner_up"] == top[1]["relation"]
        assert r["margin"] == pytest.approx(top[0]["score"] - top[1]["score"], abs=1e-4)
        assert r["nearest_description"] == top[0]["description"]
        assert r["gold"] == s.relation and r["correct"] == (r["gold"] == r["predicted"])
    assert all(r["margin"] >= 0 for r in rows)


def test_other_descriptions_are_encoded_anew_never_the_checkpoints_cache(loaded):
    own, _ = explain.relations_for(loaded, loaded.cache.descriptions())
    assert own.fingerprint == loaded.cache.fingerprint  # the same texts: the same cache
    one = robustness.description_set(loaded, k=1)
    assert all(len(t) == 1 for t in one.values())
    cache, _ = explain.relations_for(loaded, one)
    assert cache.fingerprint != loaded.cache.fingerprint
    assert cache.mask.sum() == len(loaded.label_names)
    np.testing.assert_allclose(cache.embeddings[:, 0], loaded.cache.embeddings[:, 0], atol=1e-5)
    ev, _ = robustness.evaluate_variant(loaded, "val", descriptions=one)
    texts = {r["nearest_description"] for r in explain.explain_rows(ev)}
    assert texts <= {t[0] for t in one.values()}


def test_classification_explain_has_no_description(tmp_path_factory):
    from fixtures import write_mnre_fixture
    from roc_testutil import tiny_config

    from roc_jax import train_lib

    data = write_mnre_fixture(tmp_path_factory.mktemp("cls_data"))
    workdir = tmp_path_factory.mktemp("cls_run")
    config = tiny_config(data, "text,classification")
    config.num_epochs = 1  # a checkpoint with dev metrics is all this test needs
    train_lib.train_and_evaluate(config, workdir)
    cls = roc_jax.load(workdir)
    ev, _ = robustness.evaluate_variant(cls, "val", "untyped")
    rows = explain.explain_rows(ev)
    assert ev.desc_sim is None and ev.prototypes is None
    assert {r["nearest_description"] for r in rows} == {None}
    assert ev.metrics["num_examples"] == 16
    with pytest.raises(ValueError, match="need the retrieval head"):
        explain.relations_for(cls, {n: ["x"] for n in cls.label_names})
    with pytest.raises(ValueError, match="need the retrieval head"):
        robustness.description_set(cls, k=1)


def test_eval_cli_perturbation_and_explain(trained, tmp_path):
    workdir = trained[0]
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), f"--workdir={workdir}", "--split=val",
         "--perturbation=typos_high", "--perturbation_seed=2", "--explain",
         f"--output_dir={tmp_path / 'eval'}"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "eval_typos_high_s2"
    metrics = json.loads((out / "metrics_val.json").read_text())
    assert metrics["variant"]["perturbation"] == "typos_high"
    assert metrics["variant"]["perturbation_seed"] == 2 and metrics["num_examples"] == 16
    assert (out / "report_val.txt").exists() and (out / "confusion_val.png").exists()
    rows = [json.loads(x) for x in (out / "explain_val.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and rows[0]["id"] == "mnre_val.txt:1"
    assert not (tmp_path / "eval").exists()  # the clean eval's folder is left alone


def test_summary_drops_per_seed_and_mean_drop_over_shared_perturbations():
    def run(head, seed, variant, f1):
        return {"head": head, "seed": seed, "variant": variant, "f1": f1}

    runs = [run("roc", 0, "clean", 60.0), run("roc", 1, "clean", 62.0),
            run("roc", 0, "untyped", 55.0), run("roc", 1, "untyped", 59.0),
            run("roc", 0, "paraphrase", 50.0),
            run("cls", 0, "clean", 58.0), run("cls", 0, "untyped", 57.0),
            run("cls", 0, "no_images", 50.0)]
    out = robustness.summarize(runs)
    untyped = out["variants"]["untyped"]["roc"]
    assert untyped["drop_per_seed"] == {"0": 5.0, "1": 3.0}
    assert untyped["drop_mean"] == pytest.approx(4.0)
    assert untyped["drop_std"] == pytest.approx(2 ** 0.5)
    assert untyped["f1_mean"] == pytest.approx(57.0) and untyped["seeds"] == 2
    s = out["summary"]
    # no_images: classification only; paraphrase: ROC only; neither is shared
    assert s["shared_perturbations"] == ["untyped"]
    assert s["roc_mean_drop"] == pytest.approx(4.0) and s["cls_mean_drop"] == pytest.approx(1.0)
    assert s["roc_seeds"] == [0, 1] and s["cls_seeds"] == [0]


def test_figures_write_small_pngs_from_synthetic_results(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("figures", REPO / "tools" / "figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    rng = np.random.default_rng(0)
    names = ["None", *(f"/per/per/r{i}" for i in range(22))]
    labels = rng.integers(0, 23, 500)
    pairs = rng.normal(size=(500, 16)) + np.eye(23, 16)[labels] * 3
    protos = np.eye(23, 16)
    xy, proto_xy, ratio = figures.pca_2d(pairs, protos)
    assert xy.shape == (500, 2) and proto_xy.shape == (23, 2) and 0 < ratio.sum() <= 1
    rows = [{"relation": n, "f1": 0.5, "support": 3} for n in names]
    variants = (("clean", 50), ("untyped", 45))
    report = robustness.summarize([{"head": h, "seed": 0, "variant": v, "f1": f}
                                   for h in ("roc", "cls") for v, f in variants])
    top = [{"relation": n, "probability": 0.3, "description": "The head ... the tail."}
           for n in names[:3]]
    paths = [figures.pair_map(pairs, labels, protos, names, tmp_path / "map.png"),
             figures.per_relation_f1({"ROC": rows, "classification": rows}, tmp_path / "f1.png"),
             figures.confusion(rng.integers(0, 30, (23, 23)), names, "t", tmp_path / "cm.png"),
             figures.examples([{"text": "x [[a]] y [[b]]", "gold": names[1], "top": top}] * 5,
                              tmp_path / "ex.png"),
             figures.robustness(report, tmp_path / "rob.png")]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 200_000
