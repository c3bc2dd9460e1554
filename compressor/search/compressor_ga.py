"""The Compressor paper's size-budget search (Shi et al., ASE 2022), as a check and for Transformer
students: a genetic algorithm over (layers, hidden, heads, FFN, vocabulary) with a closed-form cost
model and no training.

Fitness = GFLOPs - |size_MB - target_MB|: more compute within the size is taken as more capacity.
The cost model follows the paper's reference code (an ELECTRA-style FLOPs counter at sequence length
514 that charges the embedding lookup as a dense matmul); METHODS.md lists its check numbers.
"""
from __future__ import annotations

import random

# FLOPs per element of the small operations, as the reference counter charges them.
DROPOUT, LAYER_NORM, GELU, SOFTMAX = 4, 5, 8, 5
SEQ = 514  # RoBERTa's position table: 512 tokens + 2

# The paper's space, in the order it prints configs (A, H, FFN, L, V): the order matters, since
# crossover cuts it and mutation re-samples from a locus to the end. With seed 1 this GA finds the
# paper's own 3 MB config. Heads stop at 8 as in the paper: the cost model charges softmax per head,
# so 16 heads add FLOPs for no parameters and the GA would chase them (its 25/50 MB models use 16).
PAPER_SPACE = {
    "heads": [1, 2, 4, 8],
    "hidden": list(range(16, 769, 16)),
    "ffn": list(range(32, 3041, 32)),
    "layers": list(range(1, 13)),
    "vocab": list(range(1000, 50001, 1000)),
}


def params(g: dict, seq: int = SEQ) -> int:
    """Parameters of a RoBERTa-layout classifier with genome g (layers, hidden, heads, ffn, vocab)."""
    h, i = g["hidden"], g["ffn"]
    embeddings = g["vocab"] * h + seq * h + 3 * h  # tokens, positions, token type + LayerNorm
    block = 4 * (h * h + h) + 2 * h * i + i + h + 4 * h  # Q, K, V, output; FFN in and out; 2 LayerNorms
    head = 2 * (h * h + h) + 2 * h + 2  # pooler, dense, 2-way output
    return embeddings + g["layers"] * block + head


def size_mb(g: dict) -> float:
    return 4 * params(g) / 1e6  # fp32


def flops(g: dict, seq: int = SEQ) -> int:
    """Inference FLOPs for one sequence of ``seq`` tokens (multiply-add = 2)."""
    h, i, a, s = g["hidden"], g["ffn"], g["heads"], seq
    block = (6 * h * h + 3 * h  # Q, K, V and biases
             + 2 * h * s + (SOFTMAX + DROPOUT + 1) * s * a + 2 * h * s  # scores, softmax/dropout/scale, mix
             + 2 * h * h + h + DROPOUT * h + h + LAYER_NORM  # attention output
             + 2 * h * i + GELU * i + i  # FFN in
             + 2 * h * i + h + DROPOUT * h + h + LAYER_NORM * h)  # FFN out
    embed = 2 * h * g["vocab"] + 2 * h * (s + 2) + 2 * h + LAYER_NORM * h + DROPOUT * h
    head = 2 * h * h + h + (DROPOUT + GELU) * h + 2 * h
    return (g["layers"] * block + embed + head) * s


def fitness(g: dict, target_mb: float) -> float:
    return flops(g) / 1e9 - abs(size_mb(g) - target_mb)


def _key(g: dict) -> tuple:
    return tuple(g[k] for k in sorted(g))


def search(target_mb: float, space: dict | None = None, population: int = 50, generations: int = 100,
           crossover: float = 0.6, seed: int = 0) -> dict:
    """The paper's GA. Each generation makes ``population`` children, each from two random parents:
    single-point crossover with probability ``crossover``, else a copy of one parent mutated from a random
    locus to the end; duplicates (by hash of the genome) are mutated again; parents and children are
    merged and the best ``population`` kept. Returns the best genome with its size, FLOPs and fitness."""
    space = space or PAPER_SPACE
    genes = list(space)
    rng = random.Random(seed)
    seen: set[tuple] = set()

    def mutate(g: dict) -> dict:
        locus = rng.randrange(len(genes))
        return {**g, **{k: rng.choice(space[k]) for k in genes[locus:]}}

    def novel(g: dict) -> dict:
        for _ in range(1000):  # the space is large; this only fails when it is nearly exhausted
            if _key(g) not in seen:
                break
            g = mutate(g)
        seen.add(_key(g))
        return g

    pop = [novel({k: rng.choice(space[k]) for k in genes}) for _ in range(population)]
    for _ in range(generations):
        children = []
        for _ in range(population):
            mom, dad = rng.sample(pop, 2)
            if rng.random() < crossover:
                cut = rng.randrange(1, len(genes))
                child = {k: (mom if j < cut else dad)[k] for j, k in enumerate(genes)}
            else:
                child = mutate(mom)
            children.append(novel(child))
        pop = sorted(pop + children, key=lambda g: fitness(g, target_mb), reverse=True)[:population]
    best = pop[0]
    return {"genome": best, "params": params(best), "size_mb": size_mb(best), "gflops": flops(best) / 1e9,
            "fitness": fitness(best, target_mb), "evaluated": len(seen)}
