"""NT-Xent: against a hand-written reference and a closed form, edge cases, and the distributed global batch."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dinocell.distributed import process_group_ends
from dinocell.loss import nt_xent_loss


def _reference(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """The SimCLR paper's formula, literally: views interleaved as 2k, 2k+1; l(i, j) = -log(exp(s_ij / t) /
    sum_{k != i} exp(s_ik / t)); loss = mean over k of l(2k, 2k+1) + l(2k+1, 2k), in float64 with Python loops."""
    views = []
    for a, b in zip(z_a.double(), z_b.double()):
        views += [a / a.norm(), b / b.norm()]

    def pair_loss(i: int, j: int) -> torch.Tensor:
        sims = [views[i] @ views[k] / temperature for k in range(len(views))]
        return -(sims[j] - torch.logsumexp(torch.stack([s for k, s in enumerate(sims) if k != i]), 0))

    n = len(z_a)
    return sum(pair_loss(2 * k, 2 * k + 1) + pair_loss(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


@pytest.mark.parametrize(("batch", "temperature"), [(1, 0.1), (5, 0.1), (8, 0.5)])
def test_matches_the_papers_formula_and_its_gradient(batch, temperature) -> None:
    torch.manual_seed(batch)
    z_a = torch.randn(batch, 16, dtype=torch.float64, requires_grad=True)
    z_b = (z_a.detach() + 0.5 * torch.randn(batch, 16, dtype=torch.float64)).requires_grad_(True)
    loss = nt_xent_loss(z_a, z_b, temperature)
    expected = _reference(z_a, z_b, temperature)
    torch.testing.assert_close(loss, expected.float())
    grads = torch.autograd.grad(loss, (z_a, z_b))
    expected_grads = torch.autograd.grad(expected, (z_a, z_b))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_closed_form_on_orthogonal_views() -> None:
    """Views a_i = b_i = e_i: the positive has cosine 1, the 2(N-1) negatives 0, so the loss is
    log(1 + 2(N-1) exp(-1/t)) for every anchor."""
    n = 6
    eye = torch.eye(n, 10)
    for t in (0.1, 0.5):
        assert nt_xent_loss(eye, eye, t).item() == pytest.approx(math.log(1 + 2 * (n - 1) * math.exp(-1 / t)), rel=1e-3)
    torch.manual_seed(0)
    z_a, z_b = torch.randn(4, 8), torch.randn(4, 8)
    assert nt_xent_loss(z_a, z_b) == nt_xent_loss(z_a, z_b, 0.1)  # SimCLR's temperature is the default
    # one image: the positive is the only candidate, nothing to contrast with
    assert nt_xent_loss(eye[:1], eye[:1] * 3).item() == pytest.approx(0.0, abs=1e-7)


def test_symmetric_scale_invariant_and_fp32_under_autocast() -> None:
    torch.manual_seed(0)
    z_a, z_b = torch.randn(4, 8), torch.randn(4, 8)
    loss = nt_xent_loss(z_a, z_b)
    torch.testing.assert_close(nt_xent_loss(z_b, z_a), loss)
    torch.testing.assert_close(nt_xent_loss(3 * z_a, 0.5 * z_b), loss)  # rows are L2-normalised
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = nt_xent_loss(z_a.bfloat16(), z_b.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, nt_xent_loss(z_a.bfloat16().float(), z_b.bfloat16().float()))


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"same shape and B >= 1, got \(4, 8\) and \(3, 8\)"):
        nt_xent_loss(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"got \(4,\) and \(4,\)"):
        nt_xent_loss(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match=r"temperature must be > 0, got 0.0; SimCLR uses 0.1"):
        nt_xent_loss(torch.randn(4, 8), torch.randn(4, 8), temperature=0.0)


# ---------------------------------------------------------------------------- distributed (2 gloo processes)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, z_a: torch.Tensor, z_b: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    with process_group_ends():
        b = z_a.shape[0] // 2
        mine = [z[rank * b : (rank + 1) * b].clone().requires_grad_(True) for z in (z_a, z_b)]
        loss = nt_xent_loss(*mine, temperature=0.2)
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": [z.grad for z in mine]}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_distributed_gather_equals_single_process_on_the_global_batch(tmp_path) -> None:
    torch.manual_seed(0)
    z_a, z_b = torch.randn(6, 5), torch.randn(6, 5)
    mp.spawn(_worker, args=(_free_port(), z_a, z_b, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    single_a, single_b = z_a.clone().requires_grad_(True), z_b.clone().requires_grad_(True)
    single = nt_xent_loss(single_a, single_b, temperature=0.2)
    single.backward()
    # each rank averages over its own anchors: the mean of the rank losses is the global loss
    torch.testing.assert_close((parts[0]["loss"] + parts[1]["loss"]) / 2, single.detach())
    # the all-gather sends every rank's gradient back to the owner; DDP's average over 2 ranks then gives the
    # single-process gradient
    for view, single_grad in enumerate((single_a.grad, single_b.grad)):
        torch.testing.assert_close(torch.cat([p["grads"][view] for p in parts]) / 2, single_grad)
    # and the negatives really came from the other rank: a rank alone gives a different loss
    alone = nt_xent_loss(z_a[:3], z_b[:3], temperature=0.2)
    assert not torch.allclose(alone, parts[0]["loss"], atol=1e-3)
