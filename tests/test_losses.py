"""Losses against hand-computed values and against loop-style re-implementations of the DINOv3 definitions."""

from __future__ import annotations

import math
import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp

import dinocell.loss.koleo as koleo_module
from dinocell.distributed import process_group_ends
from dinocell.loss import dino_loss, ibot_loss, koleo_loss, logit_sum, sinkhorn_knopp, softmax_center, update_center

LN2 = math.log(2.0)
CE_34_1 = -math.log(0.75)  # student softmax [3/4, 1/4] vs teacher [1, 0]
CE_34_2 = -math.log(0.25)  # student softmax [3/4, 1/4] vs teacher [0, 1]
TEMP = 0.1
# logits that give student softmax [3/4, 1/4] at temperature 0.1
LOGITS_34 = [TEMP * math.log(3.0), 0.0]


# ---------------------------------------------------------------------------- reference-style re-implementations
def loop_sinkhorn(logits: torch.Tensor, temp: float, n_iterations: int) -> torch.Tensor:
    """Sinkhorn-Knopp written element by element in float64: prototype sums -> 1/K, then sample sums -> 1/B."""
    q = torch.exp(logits.double() / temp)
    n, k = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        for j in range(k):
            q[:, j] = q[:, j] / q[:, j].sum() / k
        for i in range(n):
            q[i, :] = q[i, :] / q[i, :].sum() / n
    return (q * n).float()


def loop_dino(student: torch.Tensor, teacher: torch.Tensor, temp: float, ignore_diagonal: bool) -> torch.Tensor:
    total, count = 0.0, 0
    for b in range(student.shape[1]):
        for s in range(student.shape[0]):
            for t in range(teacher.shape[0]):
                if ignore_diagonal and s == t:
                    continue
                total = total - (teacher[t, b] * torch.log_softmax(student[s, b] / temp, -1)).sum()
                count += 1
    return total / count


def loop_ibot(student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor, temp: float) -> torch.Tensor:
    total, row = 0.0, 0
    for crop in masks:
        n = int(crop.sum())
        for _ in range(n):
            total = total - (teacher[row] * torch.log_softmax(student[row] / temp, -1)).sum() / n
            row += 1
    return total / masks.shape[0]


def loop_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    terms = []
    for i in range(x.shape[0]):
        d = min(float((x[i] - x[j]).norm()) for j in range(x.shape[0]) if j != i)
        terms.append(-math.log(d + eps))
    return torch.tensor(sum(terms) / len(terms))


# ---------------------------------------------------------------------------- Sinkhorn-Knopp
def test_sinkhorn_one_iteration_by_hand():
    # exp(logits) = [[1, 2], [3, 4]]; /10; prototype columns -> [.25, .75] / 2 and [1/3, 2/3] / 2; rows -> 1
    probs = sinkhorn_knopp(torch.log(torch.tensor([[1.0, 2.0], [3.0, 4.0]])), temp=1.0, n_iterations=1)
    torch.testing.assert_close(probs, torch.tensor([[3 / 7, 4 / 7], [9 / 17, 8 / 17]]))


def test_sinkhorn_matches_loop_definition_and_rows_sum_to_one():
    logits = torch.randn(12, 7)
    for n_iterations in (1, 3, 5):
        probs = sinkhorn_knopp(logits, temp=0.3, n_iterations=n_iterations)
        torch.testing.assert_close(probs, loop_sinkhorn(logits, 0.3, n_iterations), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(probs.sum(1), torch.ones(12))
    assert probs.dtype == torch.float32


def test_sinkhorn_converges_to_equal_prototype_mass():
    # logits that favour some prototypes, as a collapsing teacher's do (seeded: the test does not depend on order)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 5, generator=g) * 2 + torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0])
    probs = sinkhorn_knopp(logits, temp=1.0, n_iterations=200)
    torch.testing.assert_close(probs.sum(0), torch.full((5,), 20 / 5), rtol=1e-4, atol=1e-4)
    # with the default 3 iterations the prototype masses are already much closer to equal than a softmax's
    three = sinkhorn_knopp(logits, temp=1.0).sum(0)
    soft = torch.softmax(logits, -1).sum(0)
    assert (three - 4).abs().max() < 0.5 * (soft - 4).abs().max()


def test_sinkhorn_is_fp32_for_half_input_and_rejects_bad_shapes():
    probs = sinkhorn_knopp(torch.randn(4, 3).bfloat16(), temp=0.5)
    assert probs.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        sinkhorn_knopp(torch.randn(2, 4, 3), temp=0.5)


# ---------------------------------------------------------------------------- EMA centering
def test_softmax_center_and_update_by_hand():
    probs = softmax_center(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0]]), temp=1.0)
    torch.testing.assert_close(probs, torch.tensor([[1 / (1 + math.e), math.e / (1 + math.e)]]))
    total, count = logit_sum(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(total, torch.tensor([[4.0, 6.0]]))
    torch.testing.assert_close(count, torch.tensor(2.0))
    center = update_center(torch.zeros(1, 2), total, count, momentum=0.9)
    torch.testing.assert_close(center, torch.tensor([[0.2, 0.3]]))  # 0.9 * 0 + 0.1 * mean [2, 3]
    center = update_center(center, *logit_sum(torch.tensor([[0.2, 0.3]])), momentum=0.5)
    torch.testing.assert_close(center, torch.tensor([[0.2, 0.3]]))  # a fixed point stays put
    # the statistics of two micro-batches add up to those of their union (gradient accumulation)
    a, b = torch.randn(3, 2), torch.randn(5, 2)
    (sa, ca), (sb, cb) = logit_sum(a), logit_sum(b)
    union = update_center(center, *logit_sum(torch.cat([a, b])))
    torch.testing.assert_close(update_center(center, sa + sb, ca + cb), union)


def test_no_rows_keep_sinkhorn_and_center_defined():
    # a rank (or step) without masked patches: empty targets, the center stays as it was (no 0/0)
    assert sinkhorn_knopp(torch.zeros(0, 4), temp=0.1).shape == (0, 4)
    center = torch.tensor([[0.5, -0.5]])
    torch.testing.assert_close(update_center(center, *logit_sum(torch.zeros(0, 2))), center)


# ---------------------------------------------------------------------------- DINO
def test_dino_loss_by_hand():
    uniform = torch.zeros(1, 1, 2)
    assert dino_loss(uniform, torch.tensor([[[0.25, 0.75]]])).item() == pytest.approx(LN2, abs=1e-6)
    student = torch.tensor([[LOGITS_34]])
    assert dino_loss(student, torch.tensor([[[1.0, 0.0]]])).item() == pytest.approx(CE_34_1, abs=1e-6)


def test_dino_loss_ignore_diagonal_by_hand():
    # student crop 0 -> softmax [3/4, 1/4], crop 1 -> [1/2, 1/2]; teacher crop 0 = [1, 0], crop 1 = [0, 1]
    student = torch.tensor([[LOGITS_34], [[0.0, 0.0]]])  # [S=2, B=1, K=2]
    teacher = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    pairs = {(0, 0): CE_34_1, (0, 1): CE_34_2, (1, 0): LN2, (1, 1): LN2}
    assert dino_loss(student, teacher).item() == pytest.approx(sum(pairs.values()) / 4, abs=1e-6)
    off_diagonal = (pairs[0, 1] + pairs[1, 0]) / 2
    assert dino_loss(student, teacher, ignore_diagonal=True).item() == pytest.approx(off_diagonal, abs=1e-6)


@pytest.mark.parametrize(("n_student", "n_teacher", "ignore_diagonal"), [(6, 2, False), (2, 2, True), (3, 2, True)])
def test_dino_loss_matches_loop_definition(n_student, n_teacher, ignore_diagonal):
    student = torch.randn(n_student, 4, 9, requires_grad=True)
    teacher = torch.softmax(torch.randn(n_teacher, 4, 9), -1)
    ours = dino_loss(student, teacher, student_temp=0.2, ignore_diagonal=ignore_diagonal)
    ref = loop_dino(student, teacher, 0.2, ignore_diagonal)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(*(torch.autograd.grad(v, student)[0] for v in (ours, ref)))


def test_dino_loss_rejects_empty_and_mismatched_inputs():
    with pytest.raises(ValueError, match="no .* pairs"):
        dino_loss(torch.zeros(0, 2, 3), torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="same B and K"):
        dino_loss(torch.zeros(2, 2, 3), torch.zeros(2, 3, 3))


# ---------------------------------------------------------------------------- iBOT
def mask_weights(masks: torch.Tensor) -> torch.Tensor:
    """1 / (masked patches of the crop) per masked patch, row-major, by a plain loop (what collate precomputes)."""
    return torch.tensor([1.0 / int(row.sum()) for row in masks for flag in row if flag])


def test_ibot_loss_by_hand():
    # crop 0 has 1 masked patch (weight 1), crop 1 has 2 (weights 1/2); result divided by B = 2 crops
    masks = torch.tensor([[True, False, False], [True, True, False]])
    student = torch.tensor([LOGITS_34] * 3)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    expected = (CE_34_1 + (CE_34_2 + (CE_34_1 + CE_34_2) / 2) / 2) / 2
    assert ibot_loss(student, teacher, mask_weights(masks), 2).item() == pytest.approx(expected, abs=1e-6)
    # unmasked crops still count in the denominator (4 crops, the same masked patches)
    assert ibot_loss(student, teacher, mask_weights(masks), 4).item() == pytest.approx(expected / 2, abs=1e-6)


def test_ibot_loss_matches_loop_definition():
    masks = torch.rand(6, 16) < 0.4
    masks[0] = False  # an unmasked crop
    n = int(masks.sum())
    student = torch.randn(n, 11, requires_grad=True)
    teacher = torch.softmax(torch.randn(n, 11), -1)
    ours = ibot_loss(student, teacher, mask_weights(masks), masks.shape[0])
    ref = loop_ibot(student, teacher, masks, TEMP)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(*(torch.autograd.grad(v, student)[0] for v in (ours, ref)))


def test_ibot_loss_without_masked_patches_is_zero_with_graph():
    student = torch.zeros(0, 4, requires_grad=True)
    loss = ibot_loss(student, torch.zeros(0, 4), torch.zeros(0), 2)
    assert loss.item() == 0.0
    loss.backward()  # DDP needs the iBOT head in the graph on every rank, even one without masked patches
    assert student.grad.shape == (0, 4)


def test_ibot_loss_rejects_rows_that_do_not_match_the_weights():
    with pytest.raises(ValueError, match=r"mask_weights \(3,\) must be \[M\] = \[2\]"):
        ibot_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(3), 2)
    with pytest.raises(ValueError, match="both be"):
        ibot_loss(torch.zeros(2, 4), torch.zeros(3, 4), torch.ones(2), 2)


# ---------------------------------------------------------------------------- KoLeo
def test_koleo_by_hand():
    # unit vectors: d(0,1) = sqrt(0.8), d(1,2) = sqrt(3.2), d(0,2) = 2; nearest: 0->1, 1->0, 2->1
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    expected = -(2 * math.log(math.sqrt(0.8)) + math.log(math.sqrt(3.2))) / 3
    assert koleo_loss(x).item() == pytest.approx(expected, abs=1e-6)
    assert koleo_loss(x * 7.0).item() == pytest.approx(expected, abs=1e-6)  # rows are L2-normalised first


def test_koleo_matches_loop_definition():
    x = torch.randn(10, 6)
    torch.testing.assert_close(koleo_loss(x), loop_koleo(x).float())


def test_koleo_candidates_give_the_distributed_split():
    x = torch.randn(8, 5)
    whole = koleo_loss(x)
    halves = [koleo_loss(x[i : i + 4], candidates=x, offset=i) for i in (0, 4)]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole)
    with pytest.raises(ValueError, match="offset 6"):
        koleo_loss(x[:4], candidates=x, offset=6)


def test_koleo_batch_of_one_is_zero_with_graph_and_warns_once(monkeypatch):
    monkeypatch.setattr(koleo_module, "_warned_small_batch", False)
    x = torch.randn(1, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="at least 2 samples"):
        loss = koleo_loss(x)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert koleo_loss(torch.randn(1, 4)).item() == 0.0  # second time: no warning


def test_koleo_identical_points_are_finite():
    # distance of identical rows = ||0 + 1e-8||_2 over D = 4 dims = 2e-8 (the reference pairwise-distance eps)
    loss = koleo_loss(torch.ones(3, 4))
    assert loss.item() == pytest.approx(-math.log(2e-8 + 1e-8), rel=1e-5)


def test_losses_run_in_fp32_under_autocast():
    student = torch.randn(2, 3, 8).bfloat16()
    teacher = torch.softmax(torch.randn(2, 3, 8), -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = dino_loss(student, teacher), koleo_loss(student[0])
    assert all(v.dtype == torch.float32 for v in inside)
    torch.testing.assert_close(inside[0], dino_loss(student.float(), teacher))
    torch.testing.assert_close(inside[1], koleo_loss(student[0].float()))


# ---------------------------------------------------------------------------- distributed (2 gloo processes)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(
    rank: int, port: int, logits: torch.Tensor, split: int, feats: torch.Tensor, out_dir: str
) -> None:
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    with process_group_ends():
        part = logits[:split] if rank == 0 else logits[split:]
        probs = sinkhorn_knopp(part, temp=0.2)
        center = update_center(torch.zeros(1, logits.shape[1]), *logit_sum(part), momentum=0.9)
        # distributed KoLeo as the trainer does it: neighbours over the autograd-gathered global batch
        b = feats.shape[0] // 2
        x = feats[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        koleo = koleo_loss(x, candidates=torch.cat(dist_fn.all_gather(x)), offset=rank * b)
        koleo.backward()
        result = {"probs": probs, "center": center, "koleo": koleo.detach(), "koleo_grad": x.grad}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_distributed_losses_equal_single_process(tmp_path):
    logits = torch.randn(10, 6)
    split = 3  # unequal shares (3 and 7 rows) as with iBOT masked patches
    feats = torch.randn(8, 5)
    mp.spawn(_distributed_worker, args=(_free_port(), logits, split, feats, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    torch.testing.assert_close(torch.cat([p["probs"] for p in parts]), sinkhorn_knopp(logits, temp=0.2))
    single_center = update_center(torch.zeros(1, 6), *logit_sum(logits), momentum=0.9)
    for p in parts:
        torch.testing.assert_close(p["center"], single_center)
    # KoLeo: the mean of the rank losses is the single-process loss, and rank gradients (summed back to the owner
    # by the all-gather; DDP then averages over 2 ranks) are the single-process gradient
    x = feats.clone().requires_grad_(True)
    single = koleo_loss(x)
    single.backward()
    torch.testing.assert_close((parts[0]["koleo"] + parts[1]["koleo"]) / 2, single.detach())
    torch.testing.assert_close(torch.cat([p["koleo_grad"] for p in parts]) / 2, x.grad)
