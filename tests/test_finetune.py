"""The bundle's ``finetune`` run (train.yaml + finetune.yaml) on tiny PNGs: loss, best model, schedule, early
stopping, exact resume, pruned widths and decoder-only training."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from medcore_monai.config import ConfigError
from medcore_monai.demo import write_synthetic_pairs
from medcore_monai.handlers import GradientClipping
from medcore_monai.networks import build_sam, load_sam, read_checkpoint, read_model_state, save_sam, slim_block_

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
LR = 1e-3  # 10x the default so that two epochs visibly lower the loss of a random tiny model


class _Crash(RuntimeError):
    """Stands in for an interruption (a killed process) at a chosen point of a run."""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pngs")
    write_synthetic_pairs(root, 8, 64, seed=3)
    return root


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "medsam_tiny.pth"
    torch.save(build_sam("tiny", seed=0).state_dict(), path)
    return path


class _Run(SimpleNamespace):
    """What a test reads back from one run: the workflow, per-epoch losses / learning rates, weight snapshots."""


def _workflow(checkpoint: Path, data_root: Path, out: Path, **keys) -> ConfigWorkflow:
    overrides = {
        "bundle_root": str(REPO / "bundle"),
        "checkpoint": str(checkpoint),
        "data_roots": [str(data_root)],
        "finetune_dir": str(out),
        "epochs": 2,
        "batch_size": 2,
        "lr": LR,
        "patience": 0,
        "progress": False,
    } | keys
    config = [str(CONFIGS / "train.yaml"), str(CONFIGS / "finetune.yaml")]
    return ConfigWorkflow(config_file=config, run_id="finetune", workflow_type=None, **overrides)


def _finetune(checkpoint: Path, data_root: Path, out: Path, crash_at_epoch: int | None = None, **keys) -> _Run:
    """Run the bundle's ``finetune``, recording what the trainer and evaluator did; optionally crash at an epoch."""
    flow = _workflow(checkpoint, data_root, out, **keys)
    flow.initialize()
    trainer = flow.parser.get_parsed_content("train#trainer")
    evaluator = flow.parser.get_parsed_content("validate#evaluator")
    network = flow.parser.get_parsed_content("network")
    run = _Run(flow=flow, trainer=trainer, evaluator=evaluator, network=network, losses={}, lrs={}, weights={})

    def record_loss(engine):
        run.losses.setdefault(engine.state.epoch, []).append(float(engine.state.output[0]["loss"]))

    def record_lr(engine):
        run.lrs[engine.state.epoch] = trainer.optimizer.param_groups[0]["lr"]

    def snapshot(engine):  # after the CheckpointSaver: the weights a save at this epoch wrote
        run.weights[engine.state.epoch] = {k: v.detach().clone() for k, v in network.state_dict().items()}

    def crash(engine):
        raise _Crash(f"interrupted before epoch {engine.state.epoch}")

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record_loss)
    trainer.add_event_handler(Events.EPOCH_STARTED, record_lr)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, snapshot)
    if crash_at_epoch is not None:
        trainer.add_event_handler(Events.EPOCH_STARTED(once=crash_at_epoch), crash)
    try:
        run.result = flow.run()
    finally:
        flow.finalize()
    return run


def _mean(values) -> float:
    return float(np.mean(values))


@pytest.fixture(scope="module")
def baseline(dense, data_root, tmp_path_factory) -> tuple[_Run, Path]:
    """An uninterrupted two-epoch run (shared by several tests)."""
    out = tmp_path_factory.mktemp("baseline")
    return _finetune(dense, data_root, out), out


def test_loss_decreases(baseline):
    run, _ = baseline
    assert sorted(run.losses) == [1, 2] and len(run.losses[1]) == len(run.losses[2]) == 3  # 6 training images, 2/batch
    assert _mean(run.losses[2]) < _mean(run.losses[1])
    assert all(np.isfinite(v) for losses in run.losses.values() for v in losses)


def test_best_model_is_written_in_the_one_checkpoint_format_and_matches_the_best_epoch(baseline, dense):
    run, out = baseline
    saved = read_checkpoint(out / "model.pt")
    assert set(saved) == {"model", "medcore"}
    best_epoch = run.evaluator.state.best_metric_epoch
    assert best_epoch in (1, 2)
    for key, value in run.weights[best_epoch].items():
        assert torch.equal(saved["model"][key], value), key
    reloaded = load_sam(out / "model.pt")  # strict: stock keys, the source's widths
    assert set(reloaded.state_dict()) == set(load_sam(dense).state_dict())
    assert (out / "checkpoint_latest.pt").is_file()


def test_learning_rate_follows_the_cosine_schedule(baseline):
    run, _ = baseline
    # per epoch, from lr down to 0.01 * lr at the last epoch
    assert [run.lrs[e] for e in (1, 2)] == pytest.approx([LR, 0.01 * LR])


def test_resume_after_an_interruption_gives_identical_results(baseline, dense, data_root, tmp_path):
    reference, reference_dir = baseline
    with pytest.raises(Exception) as err:
        _finetune(dense, data_root, tmp_path, crash_at_epoch=2)
    assert "interrupted before epoch 2" in _chain(err.value)
    assert (tmp_path / "checkpoint_latest.pt").is_file()

    # a new process rebuilds everything from the config; the training checkpoint restores the rest
    resumed = _finetune(dense, data_root, tmp_path)
    assert sorted(resumed.losses) == [2]  # epoch 1 is not trained again
    assert resumed.losses[2] == pytest.approx(reference.losses[2], rel=1e-5)
    assert resumed.lrs[2] == pytest.approx(reference.lrs[2])
    for name in ("checkpoint_latest.pt", "model.pt"):
        got, want = read_checkpoint(tmp_path / name)["model"], read_checkpoint(reference_dir / name)["model"]
        for key, value in want.items():
            assert torch.allclose(got[key], value, atol=1e-6), (name, key)

    again = _finetune(dense, data_root, tmp_path)  # a finished run has nothing left to do
    assert again.losses == {} and again.trainer.state.epoch == 2


def test_early_stopping_when_validation_stalls_and_a_stopped_run_stays_stopped(dense, data_root, tmp_path):
    # lr=0 keeps the weights, so the validation BF1 never improves after epoch 1
    keys = {"epochs": 5, "lr": 0.0, "patience": 1}
    run = _finetune(dense, data_root, tmp_path, **keys)
    assert sorted(run.losses) == [1, 2] and run.trainer.state.epoch == 2
    assert run.evaluator.state.best_metric_epoch == 1
    again = _finetune(dense, data_root, tmp_path, **keys)
    assert again.losses == {}


def test_pruned_widths_are_kept(data_root, tmp_path):
    sam = build_sam("tiny", seed=0)
    slim_block_(sam.image_encoder.blocks[1], [0, 2], range(300))  # a compact (slimmed) MedSAM
    source = tmp_path / "model_pruned.pt"
    save_sam(sam, source)
    out = tmp_path / "ft"
    _finetune(source, data_root, out, epochs=1)
    tuned = load_sam(out / "model.pt")
    block = tuned.image_encoder.blocks[1]
    assert block.attn.num_heads == 2 and block.mlp.lin1.out_features == 300
    assert read_checkpoint(out / "model.pt")["medcore"]["blocks"][1]["kept_heads"] == [0, 2]
    before, after = read_model_state(source), tuned.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


def test_defaults_read_the_pruning_run_folder(tmp_path):
    """output_dir is the pruning run's folder: its model_pruned.pt and splits.json in, a finetune/ folder out."""
    config = [str(CONFIGS / "train.yaml"), str(CONFIGS / "finetune.yaml")]
    flow = ConfigWorkflow(config_file=config, workflow_type=None, output_dir=str(tmp_path))
    flow.parser.parse()
    assert flow.parser.get_parsed_content("checkpoint") == f"{tmp_path}/model_pruned.pt"
    assert flow.parser.get_parsed_content("ckpt_dir") == f"{tmp_path}/finetune"
    assert flow.parser.get_parsed_content("split_manifest") is None
    (tmp_path / "splits.json").write_text("{}")
    flow.parser.parse()
    assert flow.parser.get_parsed_content("split_manifest") == f"{tmp_path}/splits.json"


def test_decoder_only_finetuning_leaves_the_encoder_untouched(dense, data_root, tmp_path):
    out = tmp_path / "ft"
    _finetune(dense, data_root, out, epochs=1, trainable_modules=["mask_decoder"], tensorboard_dir=str(tmp_path / "tb"))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    before, after = load_sam(dense).state_dict(), load_sam(out / "model.pt").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("mask_decoder.") for k in changed)
    assert not any(k.startswith("mask_decoder.iou_prediction_head.") for k in changed)


def test_unknown_trainable_modules_fail_at_start(dense, data_root, tmp_path):
    flow = _workflow(dense, data_root, tmp_path, trainable_modules=["decoder"])
    with pytest.raises(Exception) as err:
        flow.initialize()
    assert "unknown trainable modules ['decoder']" in _chain(err.value)
    assert not list(tmp_path.iterdir())


def test_unknown_settings_fail_at_start(dense, data_root, tmp_path):
    flow = _workflow(dense, data_root, tmp_path, epochz=3)
    with pytest.raises(Exception) as err:
        flow.initialize()
    assert isinstance(err.value.__cause__, ConfigError) and "unknown key 'epochz'" in _chain(err.value)


def _chain(error: BaseException | None) -> str:
    """The messages of an exception and its causes (MONAI wraps errors raised inside config expressions)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


def test_gradient_clipping_under_amp_unscales_first():
    # CPU GradScaler stands in for the CUDA one: same unscale_/step bookkeeping.
    layer = torch.nn.Linear(4, 1, bias=False)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(layer(torch.full((1, 4), 10.0)).sum()).backward()  # unscaled gradient norm 20
    before = layer.weight.detach().clone()
    GradientClipping(max_norm=1.0)(SimpleNamespace(amp=True, scaler=scaler, optimizer=optimizer))
    assert float(layer.weight.grad.norm()) == pytest.approx(1.0, rel=1e-4)
    scaler.step(optimizer)  # must not unscale a second time
    assert float((before - layer.weight.detach()).norm()) == pytest.approx(1.0, rel=1e-4)
