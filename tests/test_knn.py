"""kNN: faiss search + weighted vote against an independent float64 brute force and scikit-learn."""

import numpy as np
import pytest
import torch
from helpers import knn_top1
from sklearn.neighbors import NearestNeighbors

from evaluators.accuracy import topk_hits
from evaluators.knn import NeighbourIndex, evaluate_knn, knn_grid, weighted_votes

CLASSES = 10


def random_split(n, dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


def brute_force_predictions(bank, bank_y, queries, k, temperature, top=5):
    """float64 numpy: cosine similarity, the k most similar, exp(sim / T) summed per class."""
    b = bank.double().numpy()
    q = queries.double().numpy()
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims = q @ b.T
    out = np.full((len(q), top), -1)
    for i, row in enumerate(sims):
        nearest = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(CLASSES)
        np.add.at(votes, bank_y.numpy()[nearest], np.exp(row[nearest] / temperature))
        ranked = [c for c in np.argsort(-votes, kind="stable") if votes[c] > 0][:top]
        out[i, : len(ranked)] = ranked
    return out


def predictions(bank, bank_y, queries, k, temperature, top=5):
    """The evaluator's search and vote, read out as classes in vote order (-1: no vote)."""
    sims, idx = NeighbourIndex(bank).search(queries, k)
    votes = weighted_votes(sims, bank_y[idx], temperature, CLASSES)
    scores, classes = votes.topk(top, dim=1)
    return classes.masked_fill(scores <= 0, -1).numpy()


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (10, 0.07), (20, 0.5), (200, 0.07)])
def test_predictions_equal_float64_brute_force(k, temperature):
    bank, bank_y = random_split(600)
    queries, _ = random_split(150, seed=1)
    ours = predictions(bank, bank_y, queries, k, temperature)
    reference = brute_force_predictions(bank, bank_y, queries, k, temperature)
    np.testing.assert_array_equal(ours, reference)


def test_grid_accuracy_equals_brute_force_hits():
    bank, bank_y = random_split(600)
    queries, query_y = random_split(150, seed=1)
    grid = knn_grid(
        NeighbourIndex(bank),
        bank_y,
        queries,
        query_y,
        [10, 20],
        [0.07, 0.2],
        CLASSES,
        chunk_size=64,
        progress=False,
    )
    for (k, t), scores in grid.items():
        ranked = brute_force_predictions(bank, bank_y, queries, k, t)
        top1 = 100 * np.mean(ranked[:, 0] == query_y.numpy())
        top5 = 100 * np.mean((ranked == query_y.numpy()[:, None]).any(1))
        assert scores == pytest.approx({"top1": top1, "top5": top5})


def test_faiss_neighbours_match_sklearn_cosine():
    bank, _ = random_split(800, dim=48)
    queries, _ = random_split(100, dim=48, seed=2)
    sims, idx = NeighbourIndex(bank).search(queries, 20)
    dist, ref = (
        NearestNeighbors(n_neighbors=20, metric="cosine", algorithm="brute")
        .fit(bank.numpy())
        .kneighbors(queries.numpy())
    )
    np.testing.assert_array_equal(idx.numpy(), ref)
    np.testing.assert_allclose(sims.numpy(), 1 - dist, atol=1e-5)


def test_matches_the_plain_torch_reference():
    train, val, test = random_split(600), random_split(60, seed=1), random_split(150, seed=2)
    result = evaluate_knn(train, val, test, CLASSES, [20], [0.07], progress=False)
    assert result.metrics["top1"] == pytest.approx(100 * knn_top1(train, test, 20, 0.07))


def test_chunking_does_not_change_the_result():
    bank, bank_y = random_split(600)
    queries, query_y = random_split(150, seed=1)
    index = NeighbourIndex(bank)
    one = knn_grid(index, bank_y, queries, query_y, [10, 200], [0.07], CLASSES, 4096, False)
    many = knn_grid(index, bank_y, queries, query_y, [10, 200], [0.07], CLASSES, 7, False)
    assert one == many


def test_ivf_with_every_list_probed_is_exact():
    bank, bank_y = random_split(2000)
    queries, query_y = random_split(100, seed=1)
    exact = knn_grid(NeighbourIndex(bank), bank_y, queries, query_y, [20], [0.07], CLASSES)
    ivf = NeighbourIndex(bank, "ivf", nlist=16, nprobe=16)
    assert knn_grid(ivf, bank_y, queries, query_y, [20], [0.07], CLASSES) == exact
    with pytest.raises(ValueError, match="ivf_nlist"):
        NeighbourIndex(bank[:10], "ivf", nlist=16)


def test_tiny_test_set_and_k_beyond_the_bank():
    """DINO's script crashes below 100 test images; here 3 test images and a 50-sample bank."""
    train, val, test = random_split(50), random_split(4, seed=1), random_split(3, seed=2)
    result = evaluate_knn(
        train, val, test, CLASSES, [10, 20, 100, 200], [0.07], chunk_size=1024, progress=False
    )
    assert "clipped" in result.details["notes"][0]
    assert {row["k"] for row in result.details["val_grid"]} == {10, 20, 50}
    assert 0 <= result.metrics["top1"] <= result.metrics["top5"] <= 100


def test_k_and_temperature_are_chosen_on_val():
    """Labels that follow the nearest neighbour reward k=1; val must pick it, not test."""
    bank, _ = random_split(400)
    bank_y = torch.arange(400) % CLASSES
    queries, _ = random_split(80, seed=1)
    nearest = NeighbourIndex(bank).search(queries, 1)[1][:, 0]
    val = (queries[:40], bank_y[nearest[:40]])
    test = (queries[40:], bank_y[nearest[40:]])
    result = evaluate_knn((bank, bank_y), val, test, CLASSES, [1, 200], [0.07, 1.0], progress=False)
    assert result.details["selected"]["k"] == 1
    assert result.metrics["top1"] == 100.0 and len(result.details["val_grid"]) == 4


def test_ties_count_against_the_true_class():
    votes = torch.tensor(
        [
            [3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    hits = topk_hits(votes, torch.tensor([1, 4, 1]), (1, 5))
    # an unvoted class is never a top-5 hit; a tie for first is not a top-1 hit
    assert hits.tolist() == [[0.0, 1.0], [0.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize("bank_chunk", [7, 600, 4096])  # several chunks, one exact, one larger
def test_torch_search_equals_faiss_on_cpu_tensors(bank_chunk):
    """The GPU path (chunked matmul + top-k with a running merge), run on CPU tensors: the same
    neighbours as faiss, the same similarities to float32 rounding, the same kNN grid."""
    from evaluators.knn import TorchIndex

    bank, bank_y = random_split(600)
    queries, query_y = random_split(150, seed=1)
    faiss_index = NeighbourIndex(bank)
    torch_index = TorchIndex(bank, torch.device("cpu"), bank_chunk=bank_chunk)
    for k in (1, 20, 200):
        f_sims, f_idx = faiss_index.search(queries, k)
        t_sims, t_idx = torch_index.search(queries, k)
        assert torch.equal(f_idx, t_idx)
        torch.testing.assert_close(t_sims, f_sims, rtol=0, atol=1e-5)
    grids = [
        knn_grid(
            index,
            bank_y,
            queries,
            query_y,
            [10, 200],
            [0.07, 0.5],
            CLASSES,
            chunk_size=64,
            progress=False,
        )
        for index in (faiss_index, torch_index)
    ]
    assert grids[0] == grids[1]


def test_backend_choice_and_its_errors():
    from evaluators.knn import TorchIndex, build_index

    bank, _ = random_split(50)
    cpu = torch.device("cpu")
    assert isinstance(build_index(bank, cpu), NeighbourIndex)  # auto on the CPU: faiss
    assert isinstance(build_index(bank, cpu, "torch"), TorchIndex)
    with pytest.raises(ValueError, match="knn.backend=faiss"):
        build_index(bank, cpu, "torch", kind="ivf")
    with pytest.raises(ValueError, match="unknown knn.backend 'gpu'"):
        build_index(bank, cpu, "gpu")


def test_auto_backend_on_cuda_is_torch_without_faiss_gpu(monkeypatch):
    """The choice for a CUDA device, made without one: auto picks torch (faiss-gpu absent or
    not), IVF stays with faiss, and backend=faiss without faiss-gpu searches on the CPU."""
    from evaluators import knn

    cuda = torch.device("cuda", 1)
    monkeypatch.setattr(knn, "faiss_gpu_available", lambda: False)
    assert knn.choose_backend(cuda) == "torch"
    assert knn.choose_backend(cuda, "auto", "ivf") == "faiss"
    assert knn.choose_backend(torch.device("cpu")) == "faiss"
    bank, _ = random_split(50)
    assert knn.build_index(bank, cuda, "faiss").description == "IndexFlatIP(cpu)"
