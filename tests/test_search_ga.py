"""The Compressor paper's cost model and GA reproduce its check numbers (METHODS.md)."""
import pytest

from compressor.search import compressor_ga as ga

PAPER = {  # name: (genome, MB, GFLOPs) as the paper's formulas give them
    "3MB": (dict(heads=8, hidden=96, ffn=64, layers=12, vocab=1000), 3.06, 2.25),
    "25MB": (dict(heads=16, hidden=432, ffn=128, layers=6, vocab=1000), 24.79, 9.18),
    "50MB": (dict(heads=16, hidden=480, ffn=576, layers=6, vocab=6000), 49.87, 15.9),
}


@pytest.mark.parametrize("name", PAPER)
def test_cost_model_check_numbers(name):
    g, mb, gflops = PAPER[name]
    assert ga.size_mb(g) == pytest.approx(mb, abs=0.005)
    assert ga.flops(g) / 1e9 == pytest.approx(gflops, abs=0.005)


def test_codebert_cost():
    g = dict(heads=12, hidden=768, ffn=3072, layers=12, vocab=50265)
    assert ga.params(g) / 1e6 == pytest.approx(125.2, abs=0.05)
    assert ga.flops(g) / 1e9 == pytest.approx(138, abs=0.5)


def test_ga_lands_on_the_3mb_target():
    r = ga.search(3.0, seed=1)
    assert abs(r["size_mb"] - 3.0) <= 0.1
    assert r["genome"] == PAPER["3MB"][0]  # with this seed it finds the paper's own config
    assert r["evaluated"] == 50 + 100 * 50
    assert r["fitness"] == pytest.approx(r["gflops"] - abs(r["size_mb"] - 3.0))


def test_ga_is_seeded():
    assert ga.search(25.0, generations=10, seed=3) == ga.search(25.0, generations=10, seed=3)
