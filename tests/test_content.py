"""Ad content features (shared/content.py) and the synthetic titles that carry taste (issue 17)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from shared.content import BLOCKS, ContentSpec, cached_content_features, char_ngrams, content_features, hashed_column, title_words
from shared.data.schema import UNKNOWN_CATEGORY, AdCatalog
from shared.data.synthetic import DESCRIPTIVE_WORDS, SyntheticSpec, generate

ROOT = Path(__file__).resolve().parents[1]


def _catalog() -> AdCatalog:
    return AdCatalog(
        ad_ids=("a", "b", "c"),
        categories=("shoes", UNKNOWN_CATEGORY, "shoes"),
        brands=("acme", None, "zeta"),
        titles=("Trail running shoe, waterproof", None, "Running SHOE for trails"),
    )


def test_title_words_and_char_ngrams_follow_the_documented_rules() -> None:
    assert title_words("Trail running shoe, waterproof!") == ["trail", "running", "shoe", "waterproof"]
    assert title_words(None) == []
    assert char_ngrams("ab", 3, 5) == ["<ab", "ab>", "<ab>"]


def test_hashing_is_the_same_in_another_process_with_another_hash_seed() -> None:
    # Python's own hash() is salted per process: the features must not depend on it
    here = [hashed_column(token, "word", 4096) for token in ("shoe", "running", "waterproof")]
    script = "from shared.content import hashed_column; print([hashed_column(t, 'word', 4096) for t in ('shoe', 'running', 'waterproof')])"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == str(here)


def test_blocks_are_normalized_per_ad_and_missing_content_is_an_empty_row() -> None:
    features = content_features(_catalog(), ContentSpec(word_buckets=64, char_buckets=128))
    assert set(features.blocks) == set(BLOCKS)
    assert features.matrix.shape[0] == 3
    for name in BLOCKS:
        norms = np.sqrt(np.asarray(features.block(name).multiply(features.block(name)).sum(axis=1)).ravel())
        expected = [1.0, 0.0, 1.0]  # ad "b" has no category, brand, tags or title
        np.testing.assert_allclose(norms, expected, atol=1e-6, err_msg=name)
    words = features.block("title_words").toarray()
    chars = features.block("title_chars").toarray()
    # ads a and c share words and subwords (running, shoe, trail ~ trails): similar titles, similar rows
    assert words[0] @ words[2] > 0.3 and chars[0] @ chars[2] > words[0] @ words[2]


def test_same_catalog_same_features_and_the_cache_returns_them(tmp_path: Path) -> None:
    catalog = _catalog()
    first = cached_content_features(catalog, tmp_path)
    files = list(tmp_path.glob("content-*.npz"))
    assert len(files) == 1
    again = cached_content_features(catalog, tmp_path)
    assert (first.matrix != again.matrix).nnz == 0 and first.blocks == again.blocks
    assert (content_features(catalog).matrix != first.matrix).nnz == 0
    cached_content_features(catalog, tmp_path, ContentSpec(word_buckets=32))
    assert len(list(tmp_path.glob("content-*.npz"))) == 2  # another spec, another entry


def test_content_features_import_no_text_model_or_torch() -> None:
    script = ("import sys; from shared.content import content_features; from shared.data.synthetic import synthetic_catalog; "
              "content_features(synthetic_catalog()); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_synthetic_title_words_carry_taste_beyond_the_category() -> None:
    dataset, truth = generate(SyntheticSpec(users=50, ads=400))
    words = [set(title_words(t)) & set(DESCRIPTIVE_WORDS) for t in dataset.catalog.titles]
    assert all(len(w) == 3 for w in words)
    titles = content_features(dataset.catalog).block("title_words").toarray()
    title_similarity = titles @ titles.T
    taste_similarity = truth.ad_vectors @ truth.ad_vectors.T
    categories = np.array(dataset.catalog.categories)
    same = (categories[:, None] == categories[None, :]) & ~np.eye(len(categories), dtype=bool)
    # within one category (where the category word cannot help) shared title words still mean closer taste
    correlation = np.corrcoef(title_similarity[same], taste_similarity[same])[0, 1]
    assert correlation > 0.2, correlation
