"""A defense interrupted mid-stage resumes from its stage checkpoint to the same result, and fit's
checkpoints keep what a resume needs (the step's generators, an early stop)."""

import pytest
import torch

import tsbd.train.engine as engine
from tsbd.bench.estimate import cell_seconds
from tsbd.defenses import build_defense
from tsbd.train import TrainConfig, fit

ANP_TINY = {"nb_iter": 6, "batch_size": 64}  # 3 epochs of 2 batches on the 160-image clean part


def _clean(small, n=200):
    return small.train.subset(torch.arange(0, len(small.train), len(small.train) // n)[:n])


def _interrupt_after_saves(monkeypatch, n):
    """Make fit's n-th checkpoint save raise KeyboardInterrupt right after writing the file."""
    real, calls = engine.save_checkpoint, []

    def save(path, state):
        real(path, state)
        calls.append(path)
        if len(calls) == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_checkpoint", save)
    return calls


def test_anp_interrupted_mid_optimization_resumes_to_the_same_masks(trained, small, runtime, tmp_path, monkeypatch):
    clean = _clean(small)
    whole = build_defense("anp", ANP_TINY).purify(trained, clean, runtime=runtime, seed=3)
    assert "resumed" not in whole.info and "earlier_runs" not in whole.timings

    ckpt = tmp_path / "ckpt"
    calls = _interrupt_after_saves(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        build_defense("anp", ANP_TINY).purify(trained, clean, runtime=runtime, seed=3, checkpoint_dir=ckpt)
    assert calls == [ckpt / "mask_optimization.resume.pt"]
    monkeypatch.undo()

    resumed = build_defense("anp", ANP_TINY).purify(trained, clean, runtime=runtime, seed=3, checkpoint_dir=ckpt)
    assert resumed.info["resumed"] == {"mask_optimization": 1}
    assert resumed.timings["earlier_runs"] > 0
    assert resumed.info["mask_optimization"]["epochs"] == whole.info["mask_optimization"]["epochs"] == 3
    # the perturbation draws, data order, mask momentum and BN statistics all carried over
    assert resumed.info["mask_values"] == whole.info["mask_values"]
    assert resumed.info["threshold"] == whole.info["threshold"]
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_without_checkpoint_dir_nothing_is_written(trained, small, runtime, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = _interrupt_after_saves(monkeypatch, 99)
    build_defense("anp", ANP_TINY).purify(trained, _clean(small), runtime=runtime, seed=0)
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_fit_resumes_an_early_stopped_run_as_stopped(trained, small, runtime, tmp_path):
    cfg = TrainConfig(epochs=5, batch_size=100, lr=0.01, augment=False)
    ckpt = tmp_path / "fit.pt"
    model = _copy(trained)
    first = fit(model, _clean(small), cfg, runtime, checkpoint=ckpt, progress=False,
                on_epoch_end=lambda epoch, m, stats: epoch == 2)
    assert first.stopped_early and first.epochs == 2

    again = _copy(trained)
    seen = []
    second = fit(again, _clean(small), cfg, runtime, checkpoint=ckpt, progress=False,
                 on_epoch_end=lambda epoch, m, stats: seen.append(epoch))
    assert seen == [] and second.stopped_early and second.epochs == 2 and second.resumed_at == 2
    assert second.images == 0 and second.earlier_seconds == pytest.approx(first.epoch_seconds)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_fit_shows_a_resumed_run_the_earlier_epochs_before_its_first(trained, small, runtime, tmp_path):
    """An epoch-end rule that looks back (TSBD's unlearning-stall warning) sees every epoch, earlier runs' too."""
    cfg = TrainConfig(epochs=4, batch_size=100, lr=0.01, augment=False)
    ckpt = tmp_path / "fit.pt"
    fit(_copy(trained), _clean(small), cfg, runtime, checkpoint=ckpt, progress=False,
        on_epoch_end=lambda epoch, m, stats: stats.update(mark=10 * epoch))
    torch.save({**torch.load(ckpt, weights_only=True), "epoch": 2,
                "history": torch.load(ckpt, weights_only=True)["history"][:2]}, ckpt)  # as if killed after epoch 2
    order = []
    fit(_copy(trained), _clean(small), cfg, runtime, checkpoint=ckpt, progress=False,
        on_resume=lambda earlier: order.append([h["mark"] for h in earlier]),
        on_epoch_end=lambda epoch, m, stats: order.append(epoch))
    assert order == [[10, 20], 3, 4]


def test_fit_restores_the_steps_generators(trained, small, runtime, tmp_path):
    """A step that draws from its own generator continues the draws after a resume."""
    cfg = TrainConfig(epochs=3, batch_size=100, lr=0.01, augment=False)

    def run(ckpt, stop_at=None):
        gen, draws = torch.Generator().manual_seed(7), []

        def step(model, x, y, optimizer, runtime):
            draws.append(torch.rand(1, generator=gen).item())
            return torch.zeros(())

        fit(_copy(trained), _clean(small), cfg, runtime, step=step, checkpoint=ckpt, progress=False,
            checkpoint_generators={"noise": gen}, on_epoch_end=lambda e, m, s: e == stop_at)
        return draws

    whole = run(None)
    ckpt = tmp_path / "g.pt"
    head = run(ckpt, stop_at=1)
    torch.save({**torch.load(ckpt, weights_only=True), "stopped": False}, ckpt)  # as if killed after epoch 1
    tail = run(ckpt)
    assert head + tail == whole and len(tail) == 4


def test_cell_seconds_adds_the_earlier_runs_of_a_resumed_defense():
    assert cell_seconds({"timings": {"cell": 100.0, "earlier_runs": 250.0}}) == 350.0


def _copy(model):
    import copy

    return copy.deepcopy(model)


NC_TINY = {"nc_epoch": 2, "epochs": 1, "batch_size": 100}


def test_nc_interrupted_after_some_labels_reverse_engineers_only_the_rest(trained, small, runtime, tmp_path,
                                                                          monkeypatch):
    import tsbd.defenses.nc as nc

    clean = _clean(small)
    whole = build_defense("nc", NC_TINY).purify(trained, clean, runtime=runtime, seed=1)

    ckpt = tmp_path / "ckpt"
    saves, seconds = [], {}
    real = nc.save_checkpoint

    def save(path, state):
        real(path, state)
        saves.append(sorted(state["labels"]))
        seconds.update(state["seconds"])
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(nc, "save_checkpoint", save)
    with pytest.raises(KeyboardInterrupt):
        build_defense("nc", NC_TINY).purify(trained, clean, runtime=runtime, seed=1, checkpoint_dir=ckpt)
    assert saves[-1] == ["0", "1", "2"]

    labels = []
    real_one = nc.reverse_engineer_trigger
    monkeypatch.setattr(nc, "reverse_engineer_trigger", lambda m, c, k, *a, **kw: labels.append(k) or real_one(
        m, c, k, *a, **kw))
    resumed = build_defense("nc", NC_TINY).purify(trained, clean, runtime=runtime, seed=1, checkpoint_dir=ckpt)
    assert labels == list(range(3, 10))  # only the labels left
    assert resumed.info["resumed"] == {"reverse_engineering": 3} and resumed.timings["earlier_runs"] > 0
    for key in ("mask_l1", "anomaly_index", "flagged", "reverse_epochs"):
        assert resumed.info[key] == whole.info[key], key
    # each label's cost is kept: the three done before the stop with the time that run measured
    assert resumed.info["reverse_seconds"][:3] == [seconds[str(k)] for k in range(3)]
    assert len(whole.info["reverse_seconds"]) == 10 and all(s > 0 for s in resumed.info["reverse_seconds"])
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


TSBD_TINY = {"unlearn_lr": 0.01, "unlearn_max_epochs": 4, "finetune_epochs": 3, "batch_size": 64}


@pytest.mark.parametrize("stop_after", [1, 5])  # inside the unlearning; inside the fine-tuning
def test_tsbd_interrupted_resumes_to_the_same_model(trained, small, runtime, tmp_path, monkeypatch, stop_after):
    clean = _clean(small)
    whole = build_defense("tsbd", TSBD_TINY).purify(trained, clean, runtime=runtime, seed=2)
    unlearn_epochs = whole.info["unlearn"]["epochs"]
    assert unlearn_epochs < stop_after < unlearn_epochs + 3 or stop_after <= unlearn_epochs

    ckpt = tmp_path / "ckpt"
    calls = _interrupt_after_saves(monkeypatch, stop_after)
    with pytest.raises(KeyboardInterrupt):
        build_defense("tsbd", TSBD_TINY).purify(trained, clean, runtime=runtime, seed=2, checkpoint_dir=ckpt)
    monkeypatch.undo()
    resumed = build_defense("tsbd", TSBD_TINY).purify(trained, clean, runtime=runtime, seed=2, checkpoint_dir=ckpt)

    if stop_after <= unlearn_epochs:
        assert resumed.info["resumed"] == {"clean_unlearn": stop_after}
    else:
        assert resumed.info["resumed"] == {"clean_unlearn": unlearn_epochs, "finetune": stop_after - unlearn_epochs}
    assert calls[-1].name == ("clean_unlearn" if stop_after <= unlearn_epochs else "finetune") + ".resume.pt"
    assert resumed.info["unlearn"] == whole.info["unlearn"]  # the clean accuracy of every epoch, earlier runs' too
    assert resumed.info["reinit"] == whole.info["reinit"]
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_fit_restores_what_the_step_trains_beside_the_model(trained, small, runtime, tmp_path):
    """``checkpoint_state``: a second module and its optimizer, trained by the step, continue after a resume."""
    cfg = TrainConfig(epochs=3, batch_size=100, lr=0.01, augment=False)

    def run(ckpt, stop_at=None, keep=True):
        torch.manual_seed(0)
        extra = torch.nn.Linear(4, 1)
        extra_opt = torch.optim.Adam(extra.parameters(), lr=0.1)

        def step(model, x, y, optimizer, runtime):
            loss = extra(x[:, 0, 0, :4].float()).square().mean() + 1
            extra_opt.zero_grad()
            loss.backward()
            extra_opt.step()
            return loss.detach()

        fit(_copy(trained), _clean(small), cfg, runtime, step=step, checkpoint=ckpt, progress=False,
            checkpoint_state={"extra": extra, "extra_opt": extra_opt} if keep else None,
            on_epoch_end=lambda e, m, s: e == stop_at)
        return extra.state_dict(), extra_opt.state_dict()["state"]

    whole, whole_opt = run(None)
    ckpt = tmp_path / "s.pt"
    run(ckpt, stop_at=1)
    torch.save({**torch.load(ckpt, weights_only=True), "stopped": False}, ckpt)  # as if killed after epoch 1
    resumed, resumed_opt = run(ckpt)
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    assert torch.equal(whole_opt[0]["exp_avg"], resumed_opt[0]["exp_avg"])
    # the control: the same resume without it starts the Linear afresh and ends elsewhere
    other = tmp_path / "other.pt"
    run(other, stop_at=1)
    torch.save({**torch.load(other, weights_only=True), "stopped": False}, other)
    lost, _ = run(other, keep=False)
    assert not torch.equal(lost["weight"], whole["weight"])
