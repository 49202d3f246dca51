"""CsMl and SNCLR on the CPU: exact neighbour mining (planted set, self excluded, blocked), the mined table
reaching the trainer's loader, both losses against hand-computed values (weight schedule, CutMix λ, soft
targets and their options), FIFO queue and bank, and exact mid-epoch resume of the neighbour table and bank.
(Two-process gloo runs of both are in test_trainers.py with the other methods'.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from viewpipe.errors import ViewpipeError
from viewpipe.trainers.config import TrainConfig, load_config
from viewpipe.trainers.csml import CsMl, NeighbourMiner, cosine_knn, csml_loss, cutmix, mine_neighbours
from viewpipe.trainers.engine import Trainer, pretrain
from viewpipe.trainers.models import build_backbone
from viewpipe.trainers.snclr import SNCLR, bank_neighbours, positiveness, soft_neighbour_loss

from conftest import step_losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CSML = "method_args={queue: 128, k: 3, interval: 2, switch_epoch: 1}"
SNCLR_ARGS = "method_args={bank: 100, topk: 4, dim: 32, mlp_dim: 64, tau: 0.2}"


def tiny(data: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config(None, [f"data.path={data}", "data.backend=dali", "backbone=resnet_tiny", "epochs=3",
                              "data.batch_size=16", "data.workers=1", "data.size=24", "ccrop.enabled=false",
                              f"out={out}", "log_every=1", "optim.lr=0.05", "device=cpu", "channels_last=false",
                              "knn_every=0", *extra])


# ------------------------------------------------------------------------------------------------ mining
def test_cosine_knn_finds_planted_neighbours_and_excludes_self() -> None:
    """Groups of 6 near-copies of random directions: each point's 5 neighbours are its group mates, whatever
    the blocking; exact duplicates are neighbours of each other but never of themselves (self by index)."""
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(40, 16, generator=g), dim=1)
    feats = (centres.repeat_interleave(6, 0) + 0.05 * torch.randn(240, 16, generator=g)) * 3.0  # scale: cosine
    feats[1] = feats[0]  # an exact duplicate
    group = torch.arange(240) // 6
    full = cosine_knn(feats, 5)
    for rows, cols in ((7, 11), (64, 1000), (240, 5)):  # the same sets whatever the blocking
        blocked = cosine_knn(feats, 5, row_chunk=rows, col_chunk=cols)
        assert torch.equal(blocked.sort(dim=1).values, full.sort(dim=1).values)
    assert (full != torch.arange(240)[:, None]).all()
    assert torch.equal(group[full], group[:, None].expand(-1, 5))
    assert full[0, 0] == 1 and full[1, 0] == 0
    sim = F.normalize(feats, dim=1) @ F.normalize(feats, dim=1).T  # brute force, self masked, most similar first
    sim.fill_diagonal_(-math.inf)
    got = sim.gather(1, full)
    torch.testing.assert_close(got, sim.topk(5, dim=1).values)
    assert torch.equal(cosine_knn(feats, 5, torch.tensor([3, 100, 239])), full[[3, 100, 239]])
    with pytest.raises(ViewpipeError, match="k = 240"):
        cosine_knn(feats, 240)


def test_mined_neighbours_reach_the_trainers_loader(image_folder: Path, tmp_path: Path) -> None:
    """Before epoch 0 the momentum encoder's table is published; the loader then delivers 2 views of the
    sample and 2 of one of its mined neighbours (never itself); epoch 1 (interval 2) mines nothing."""
    trainer = Trainer(tiny(image_folder, tmp_path, "method=csml", CSML))
    try:
        assert trainer.method.needs_neighbours() == 3
        np.testing.assert_array_equal(trainer.state.neighbours(), np.repeat(np.arange(96)[:, None], 3, 1))
        (miner,) = [u for u in trainer.updaters if isinstance(u, NeighbourMiner)]
        assert miner.before_epoch and miner.due(0)
        record = miner.run(trainer.method, trainer.data, 0)
        table = trainer.state.neighbours()
        expect = mine_neighbours(trainer.method.key.backbone, trainer.source, trainer.data.clean, 3)
        np.testing.assert_array_equal(table, expect)
        assert (table != np.arange(96)[:, None]).all() and 0 <= record["nn_label_agreement"] <= 1
        assert not miner.due(1)  # epoch 1 (interval 2) mines nothing
        loader = trainer.loader(0)
        loader.set_epoch(0)
        for views, labels, idx, nb, _ in loader:
            assert len(views) == 4 and all(v.shape == (len(idx), 3, 24, 24) for v in views)
            for i, n in zip(idx.tolist(), nb.tolist()):
                assert n in table[i]
            assert not torch.allclose(views[0], views[2])
    finally:
        trainer.close()


def test_methods_declare_their_state_updaters() -> None:
    """ContrastiveCrop's box updater (after an epoch), the engine's, for any method while ccrop is on; a method
    declares only its own (CsMl its neighbour miner, before an epoch, whatever ccrop says); the engine runs them
    all through StateUpdater.run."""
    from viewpipe.trainers.base import build_method
    from viewpipe.trainers.ccrop import BoxUpdater
    from viewpipe.trainers.engine import state_updaters

    for ccrop, boxes in (("ccrop.enabled=true", [BoxUpdater]), ("ccrop.enabled=false", [])):
        cfg = load_config(None, ["backbone=resnet_tiny", "method_args={queue: 64}", ccrop])
        assert build_method(cfg).updaters(cfg) == []
        box, updaters = state_updaters(cfg, build_method(cfg))
        assert [type(u) for u in updaters] == boxes and (box is None) == (not boxes)
        csml = load_config(None, ["method=csml", "backbone=resnet_tiny", CSML, ccrop])
        assert [type(u) for u in build_method(csml).updaters(csml)] == [NeighbourMiner]
        updaters = state_updaters(csml, build_method(csml))[1]
        assert [type(u) for u in updaters] == [*boxes, NeighbourMiner]
        assert [u.before_epoch for u in updaters] == [False] * len(boxes) + [True]
    miner = updaters[-1]
    assert (miner.k, miner.interval) == (3, 2) and [miner.due(e) for e in range(5)] == [True, False, True, False, True]


# ------------------------------------------------------------------------------------------------ CsMl loss
def ell(v: np.ndarray, u: np.ndarray, queue: np.ndarray, tau: float) -> float:
    """−log(e^{v·u/τ} / (e^{v·u/τ} + Σ_n e^{v·n/τ})), averaged over the batch, written out."""
    out = []
    for vi, ui in zip(v, u):
        pos = math.exp(vi @ ui / tau)
        out.append(-math.log(pos / (pos + sum(math.exp(vi @ n / tau) for n in queue.T))))
    return float(np.mean(out))


def test_csml_loss_by_hand_with_the_weight_schedule() -> None:
    g = torch.Generator().manual_seed(1)
    q, q_nn, q_mix, k, k_nn = (F.normalize(torch.randn(3, 4, generator=g), dim=1).double() for _ in range(5))
    queue = F.normalize(torch.randn(4, 6, generator=g), dim=0).double()
    tau, lam = 0.2, 0.3
    n = {name: t.numpy() for name, t in dict(q=q, qn=q_nn, qm=q_mix, k=k, kn=k_nn, Q=queue).items()}
    for a, b in ((1.0, 0.0), (0.5, 0.5)):
        by_hand = (a * ell(n["q"], n["k"], n["Q"], tau) + b * ell(n["q"], n["kn"], n["Q"], tau)
                   + a * ell(n["qn"], n["kn"], n["Q"], tau) + b * ell(n["qn"], n["k"], n["Q"], tau)
                   + lam * ell(n["qm"], n["k"], n["Q"], tau) + (1 - lam) * ell(n["qm"], n["kn"], n["Q"], tau)) / 3
        got = csml_loss(q, q_nn, q_mix, k, k_nn, queue, tau, a, b, lam)
        assert float(got) == pytest.approx(by_hand, rel=1e-6)
    method = CsMl(build_backbone("resnet_tiny"), switch_epoch=10)
    for epoch, ab in ((0, (1.0, 0.0)), (10, (1.0, 0.0)), (11, (0.5, 0.5)), (199, (0.5, 0.5))):
        method.set_epoch(epoch)  # the release's `epoch > 10` with epochs from 0
        assert method.ab == ab, epoch


def test_cutmix_pastes_one_box_and_lambda_is_the_area_left() -> None:
    torch.manual_seed(0)
    lams, lam0s = [], []
    for lam0 in np.linspace(0.05, 0.95, 40):
        mixed, lam = cutmix(torch.zeros(2, 3, 32, 32), torch.ones(2, 3, 32, 32), float(lam0))
        pasted = mixed[0, 0]
        assert torch.equal(mixed[0], mixed[1]) and torch.equal(pasted, mixed[0, 2])  # one box for the batch
        ys, xs = pasted.nonzero(as_tuple=True)
        if len(ys):  # a rectangle
            assert pasted[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
        assert lam == pytest.approx(1 - float(pasted.mean()))
        lams.append(lam)
        lam0s.append(lam0)
    assert np.all(np.array(lams) >= np.array(lam0s) - 0.05)  # clipping only ever shrinks the box


def test_csml_forward_enqueues_only_anchor_keys_at_each_level() -> None:
    torch.manual_seed(0)
    method = CsMl(build_backbone("resnet_tiny"), queue=64, levels=(2, 3, 4), level_weights=(0.25, 0.5, 1.0))
    views = [torch.randn(8, 3, 24, 24) for _ in range(4)]
    loss, logs = method(views, {})
    parts = [logs[f"loss_stage{s}"] for s in (2, 3, 4)]
    assert float(loss.detach()) == pytest.approx(float(0.25 * parts[0] + 0.5 * parts[1] + parts[2]), rel=1e-6)
    loss.backward()
    with torch.no_grad():
        keys = method.key(views[1])  # x_k (train-mode BN: the same batch gives the same keys)
    assert method.queue.shape == (3, 128, 64) and int(method.queue_ptr) == 8
    torch.testing.assert_close(method.queue[:, :, :8], keys.permute(1, 2, 0))
    assert all(p.grad is not None for p in method.query.heads.parameters())
    with pytest.raises(ViewpipeError, match="levels"):
        CsMl(build_backbone("resnet_tiny"), levels=(5,), level_weights=(1.0,))
    with pytest.raises(ViewpipeError, match="4 views|got 2 views"):
        method(views[:2], {})


# ------------------------------------------------------------------------------------------------ SNCLR loss
def test_snclr_soft_target_loss_by_hand() -> None:
    g = torch.Generator().manual_seed(2)
    B, K, d, tau = 3, 2, 4, 0.5
    p = torch.randn(B, d, generator=g, dtype=torch.float64)
    y = torch.randn(B, d, generator=g, dtype=torch.float64, requires_grad=True)
    key = F.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    nn_ = F.normalize(torch.randn(B, K, d, generator=g, dtype=torch.float64), dim=2)
    w = positiveness(y, nn_)
    P, Y, KEY, NN = (t.detach().numpy() for t in (p, y, key, nn_))
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    w_hand = np.array([np.exp([unit(Y[i]) @ NN[i, j] for j in range(K)]) for i in range(B)])
    w_hand /= w_hand.sum(1, keepdims=True)
    np.testing.assert_allclose(w.detach().numpy(), w_hand, rtol=1e-10)
    cands = [c for i in range(B) for c in [KEY[i], *NN[i]]]  # sample-major: key, then its neighbours
    total_plain = total_log_of_sum = 0.0
    for i in range(B):
        logits = np.array([unit(P[i]) @ unit(c) / tau for c in cands])
        logp = logits - np.log(np.exp(logits).sum())
        target = np.zeros(len(cands))
        target[i * (K + 1)] = 1.0
        target[i * (K + 1) + 1:(i + 1) * (K + 1)] = w_hand[i]
        total_plain += -(target * logp).sum()
        total_log_of_sum += -np.log((target * np.exp(logp)).sum())
    got = soft_neighbour_loss(p, key, nn_, w, tau)
    assert float(got.detach()) == pytest.approx(total_plain / B * 2 * tau, rel=1e-6)
    got_los = soft_neighbour_loss(p, key, nn_, w, tau, log_of_sum=True)
    assert float(got_los.detach()) == pytest.approx(total_log_of_sum / B * 2 * tau, rel=1e-6)
    got.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0  # the positiveness is not detached
    cut = positiveness(y, nn_, threshold=True)
    np.testing.assert_allclose(cut.detach().numpy(), np.where(w_hand > 1 / K, w_hand, 0), rtol=1e-10)


def test_snclr_bank_neighbours_and_fifo() -> None:
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(8, 50), dim=0)
    keys = F.normalize(torch.randn(5, 8), dim=1)
    got = bank_neighbours(keys, bank, 3)
    order = (keys @ bank).argsort(dim=1, descending=True)[:, :3]
    torch.testing.assert_close(got, bank.T[order])
    method = SNCLR(build_backbone("resnet_tiny"), dim=16, mlp_dim=32, bank=20, topk=4, attention="learned")
    assert method.momentum_at(0.0) == pytest.approx(0.99)
    assert method.momentum_at(1.0) == pytest.approx(1.0) and method.momentum_at(0.5) == pytest.approx(0.995)
    views = [torch.randn(8, 3, 24, 24) for _ in range(2)]
    before = method.bank.clone()
    loss, logs = method(views, {})
    loss.backward()
    assert int(method.bank_ptr) == 8 and torch.equal(method.bank[:, 8:], before[:, 8:])
    with torch.no_grad():  # view 2's momentum keys went in (train-mode BN: the same batch, the same keys)
        k2 = F.normalize(method.key_projector(method.key_backbone.pooled(views[1])), dim=1)
    torch.testing.assert_close(method.bank[:, :8], k2.T)
    assert method.attention is not None and method.attention.f1.weight.grad is not None
    assert 0.25 - 1e-6 <= float(logs["w_max"]) <= 1.0 + 1e-6
    with pytest.raises(ViewpipeError, match="attention"):
        SNCLR(build_backbone("resnet_tiny"), attention="dot")


def test_snclr_on_a_vit_uses_mocov3_heads(image_folder: Path, tmp_path: Path) -> None:
    """ViT backbones get the 3-layer projector and a BN-ended predictor, and train through the engine."""
    method = SNCLR(build_backbone("vit_tiny"), dim=16, mlp_dim=32, bank=64, topk=4)
    linears = [m for m in method.projector if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and isinstance(method.predictor[-1], torch.nn.BatchNorm1d)
    cfg = tiny(image_folder, tmp_path, "method=snclr", "backbone=vit_tiny", "data.size=32", "epochs=1",
               "method_args={bank: 64, topk: 4, dim: 16, mlp_dim: 32}", "optim.name=adamw", "optim.lr=1e-3")
    result = pretrain(cfg)
    assert result["step"] == 6 and np.isfinite(result["history"][0]["loss"])


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("method,args", [("csml", CSML), ("snclr", SNCLR_ARGS)])
def test_checkpoint_holds_table_and_bank_and_resumes_exactly(image_folder: Path, tmp_path: Path, method: str,
                                                              args: str) -> None:
    """A run stopped in its second epoch and resumed from last.pt logs the same losses at every later step as
    an uninterrupted one and ends with the same weights, neighbour table (CsMl: mined again before epoch 2) and
    bank (SNCLR)."""
    full = pretrain(tiny(image_folder, tmp_path / "full", f"method={method}", args))
    assert full["step"] == 18
    pretrain(tiny(image_folder, tmp_path / "cut", f"method={method}", args, "max_steps=8"))
    mid = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=False)
    assert mid["step"] == 8 and mid["loader"] == {"epoch": 1, "batch": 2}
    if method == "csml":
        assert (mid["sample_state"]["neighbours"] != np.arange(96)[:, None]).all()
    else:
        assert "bank" in mid["model"] and int(mid["model"]["bank_ptr"]) == 8 * 16 % 100
    pretrain(tiny(image_folder, tmp_path / "cut", f"method={method}", args), resume="auto")
    expect, got = step_losses(tmp_path / "full"), step_losses(tmp_path / "cut")
    for s in range(9, 19):
        assert got[s] == pytest.approx(expect[s], rel=1e-5, abs=1e-6), s
    a = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "full" / "last.pt", map_location="cpu", weights_only=False)
    for k in b["sample_state"]:  # CsMl: the neighbour table mined again before epoch 2
        np.testing.assert_array_equal(a["sample_state"][k], b["sample_state"][k])
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, rtol=1e-4, atol=1e-5)
    if method == "csml":
        events = [r for r in map(json.loads, (tmp_path / "full" / "log.jsonl").read_text().splitlines())
                  if r.get("event") == "epoch"]
        assert ["nn_label_agreement" in r for r in events] == [True, False, True]
