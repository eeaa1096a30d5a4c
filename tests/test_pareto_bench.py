"""bench/pareto.py: the Pareto front, paired differences, and where each method's allocation sits."""

import statistics

import pytest


@pytest.fixture(scope="module")
def pareto(bench_script):
    return bench_script("pareto")


def entry(swa, loss, retrieval, objective, row_loss=(1.0, 2.0), hits="10"):
    return {"swa": list(swa), "loss": loss, "retrieval_acc": retrieval, "objective": objective,
            "row_loss": list(row_loss), "hits": hits}


# A 4-layer cell at s = 0.25: one SWA layer per allocation.
A = entry([0], 1.0, 0.5, 2.0)  # best loss
B = entry([1], 1.1, 0.7, 1.5)  # best retrieval and objective
C = entry([2], 1.2, 0.6, 1.8)  # dominated by B
D = entry([3], 1.3, 0.4, 2.2)  # dominated by A, B and C
ENTRIES = [D, C, B, A]  # not in loss order


def pattern(swa_layer, num_layers=4, kv_heads=2):
    return ["." * kv_heads if i == swa_layer else "F" * kv_heads for i in range(num_layers)]


def record(method, swa_layer, granularity="layer", sparsity=0.25, seed=0):
    return {"method": method, "seed": seed, "granularity": granularity, "sparsity": sparsity,
            "pattern": pattern(swa_layer)}


def test_dominates(pareto):
    assert pareto.dominates(B, C) and not pareto.dominates(C, B)
    assert pareto.dominates(A, D) and not pareto.dominates(D, A)
    assert not pareto.dominates(A, B) and not pareto.dominates(B, A)  # a trade-off: neither dominates
    twin = dict(A, swa=[9])
    assert not pareto.dominates(A, twin) and not pareto.dominates(twin, A)  # equal: no domination
    assert not pareto.dominates(A, A)
    # better on one metric, equal on the other: dominates
    assert pareto.dominates(entry([5], 1.0, 0.6, 0), A) and pareto.dominates(entry([5], 0.9, 0.5, 0), A)
    # worse on one metric: does not, however much better on the other
    assert not pareto.dominates(entry([5], 1.01, 0.99, 0), A)


def test_pareto_front_holds_exactly_the_non_dominated_entries_sorted_by_loss(pareto):
    front = pareto.pareto_front(ENTRIES)
    assert [e["swa"] for e in front] == [[0], [1]]
    E = entry([4], 1.05, 0.6, 1.0)  # between A and B: on the front too
    assert [e["swa"] for e in pareto.pareto_front([B, E, C, D, A])] == [[0], [4], [1]]
    twin = dict(B, swa=[8])  # equal entries do not dominate each other: both stay
    assert sorted(e["swa"] for e in pareto.pareto_front(ENTRIES + [twin])) == [[0], [1], [8]]
    assert pareto.pareto_front([D]) == [D]
    assert pareto.pareto_front([]) == []


def test_paired_mean_and_two_standard_errors(pareto):
    x = entry([0], 0, 0, 0, row_loss=[1.0, 2.0, 3.0, 4.0], hits="1101")
    y = entry([1], 0, 0, 0, row_loss=[0.5, 2.0, 2.0, 4.5], hits="0111")
    p = pareto.paired(x, y)
    # loss differences [0.5, 0, 1, -0.5]: mean 0.25, sd sqrt(1.25 / 3), 2 se = 2 sd / sqrt(4) = sd
    assert p["loss"] == pytest.approx(0.25)
    assert p["loss_2se"] == pytest.approx((1.25 / 3) ** 0.5)
    assert p["loss_2se"] == pytest.approx(2 * statistics.stdev([0.5, 0.0, 1.0, -0.5]) / 2)
    # hit differences [1, 0, -1, 0]: mean 0, sd sqrt(2 / 3)
    assert p["retrieval"] == pytest.approx(0.0)
    assert p["retrieval_2se"] == pytest.approx((2 / 3) ** 0.5)
    # the other way round: the means change sign, the margins do not
    q = pareto.paired(y, x)
    assert q["loss"] == pytest.approx(-0.25) and q["loss_2se"] == pytest.approx(p["loss_2se"])
    assert q["retrieval_2se"] == pytest.approx(p["retrieval_2se"])

    z = entry([2], 0, 0, 0, row_loss=[2.0, 2.0, 3.0, 5.0], hits="1111")  # x - z = [-1, 0, 0, -1]; hits [0,0,-1,0]
    r = pareto.paired(x, z)
    assert r["loss"] == pytest.approx(-0.5) and r["loss_2se"] == pytest.approx(2 * statistics.stdev([-1, 0, 0, -1]) / 2)
    assert r["retrieval"] == pytest.approx(-0.25)
    assert r["retrieval_2se"] == pytest.approx(2 * statistics.stdev([0, 0, -1, 0]) / 2)


def test_place_methods_matches_records_and_ranks(pareto):
    records = [record("m-c", 2), record("m-d", 3, seed=1),
               record("other-sparsity", 0, sparsity=0.75), record("other-granularity", 0, granularity="kv_head"),
               {"method": "full", "seed": None, "granularity": None, "sparsity": 0.0},  # no pattern
               {"method": "two-layers", "seed": 0, "granularity": "layer", "sparsity": 0.25,
                "pattern": ["..", "..", "FF", "FF"]}]  # no entry with that allocation
    placed = pareto.place_methods(ENTRIES, records, "layer", 0.25)
    by_method = {p["method"]: p for p in placed}
    assert set(by_method) == {"m-c", "m-d"}
    c, d = by_method["m-c"], by_method["m-d"]
    assert c["swa"] == [2] and c["seed"] == 0 and (c["loss"], c["retrieval_acc"], c["objective"]) == (1.2, 0.6, 1.8)
    assert d["swa"] == [3] and d["seed"] == 1 and (d["loss"], d["retrieval_acc"], d["objective"]) == (1.3, 0.4, 2.2)
    assert c["dominated_by"] == 1 and d["dominated_by"] == 3
    # loss: A < B < C < D; retrieval: B > C > A > D; objective: B < C < A < D
    assert (c["rank_loss"], c["rank_retrieval"], c["rank_objective"]) == (3, 2, 2)
    assert (d["rank_loss"], d["rank_retrieval"], d["rank_objective"]) == (4, 4, 4)

    on_front = pareto.place_methods(ENTRIES, [record("m-a", 0), record("m-b", 1)], "layer", 0.25)
    a, b = on_front
    assert (a["method"], a["swa"], a["dominated_by"]) == ("m-a", [0], 0)
    assert (a["rank_loss"], a["rank_retrieval"], a["rank_objective"]) == (1, 3, 3)
    assert (b["method"], b["swa"], b["dominated_by"]) == ("m-b", [1], 0)
    assert (b["rank_loss"], b["rank_retrieval"], b["rank_objective"]) == (2, 1, 1)

    assert pareto.place_methods(ENTRIES, records, "layer", 0.5) == []  # no record of that cell


def test_summarize_allocations_at_least_as_good_as_every_method(pareto):
    # Methods at C and D: best of methods is loss 1.2 (C), retrieval 0.6 (C); B and C are at least as good.
    s = pareto.summarize(ENTRIES, [record("m-c", 2), record("m-d", 3), record("ignored", 0, sparsity=0.75)],
                         "layer", 0.25)
    assert (s["granularity"], s["sparsity"], s["allocations"]) == ("layer", 0.25, 4)
    assert [f["swa"] for f in s["front"]] == [[0], [1]]
    assert set(s["front"][0]) == {"swa", "loss", "retrieval_acc", "objective"}
    assert [m["method"] for m in s["methods"]] == ["m-c", "m-d"]
    assert s["best_of_methods"] == {"loss": 1.2, "retrieval_acc": 0.6}
    assert sorted(s["allocations_at_least_as_good_as_every_method"]) == [[1], [2]]
    assert s["objective_best"] == {"swa": [1], "loss": 1.1, "retrieval_acc": 0.7, "objective": 1.5}

    # Methods at A and B (the two ends of the front): best loss 1.0 and best retrieval 0.7 - no allocation has both.
    s = pareto.summarize(ENTRIES, [record("m-a", 0), record("m-b", 1)], "layer", 0.25)
    assert s["best_of_methods"] == {"loss": 1.0, "retrieval_acc": 0.7}
    assert s["allocations_at_least_as_good_as_every_method"] == []
    assert s["objective_best"]["swa"] == [1]

    # No record of the cell: no method keys, the front and the objective's best still reported.
    s = pareto.summarize(ENTRIES, [record("ignored", 0, granularity="kv_head")], "layer", 0.25)
    assert s["methods"] == [] and "best_of_methods" not in s
    assert "allocations_at_least_as_good_as_every_method" not in s
    assert s["objective_best"]["swa"] == [1] and len(s["front"]) == 2


def test_parse_args(pareto):
    args = pareto.parse_args(["--cells", "layer:0.25,layer:0.75"])
    assert args.cells == [("layer", 0.25), ("layer", 0.75)]
    assert pareto.parse_args([]).cells == [("layer", 0.25), ("layer", 0.75)]
    with pytest.raises(SystemExit):
        pareto.parse_args(["--cells", "kv_head:0.5"])
    with pytest.raises(SystemExit):
        pareto.parse_args(["--cells", "layer:0.25,kv_head:0.25"])
