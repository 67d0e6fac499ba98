"""The training progress bar: epoch, loss and an ETA that leaves the compiling steps out."""

from roc_jax import train_lib


def test_eta_is_the_median_step_time_and_the_epoch_is_shown(monkeypatch):
    clock = iter([0.0, 100.0, 101.0, 102.0, 103.0, 104.0])  # a 100 s first step: compilation
    monkeypatch.setattr(train_lib.time, "perf_counter", lambda: next(clock))
    bar = train_lib.Progress(total=10, initial=0, steps_per_epoch=4, enabled=True)
    assert bar.bar.desc == "epoch 1/3"
    for step in range(1, 6):
        bar.update(step)
    bar.set_postfix(loss="1.2345")
    # Median of (100, 1, 1, 1, 1) s per step times the 5 steps left; tqdm's own rate would say
    # 104 s / 5 steps x 5 = 104 s.
    assert bar.bar.postfix == "loss=1.2345, eta=5 s"
    assert bar.bar.desc == "epoch 2/3"  # step 5 of 4 per epoch
    bar.close()


def test_epoch_of_a_resumed_run_and_minutes():
    bar = train_lib.Progress(total=764, initial=382, steps_per_epoch=382, enabled=True)
    assert bar.bar.desc == "epoch 1/2"  # 382 steps done: the first epoch's last step
    bar.recent.extend([1.5] * 10)
    bar.set_postfix(loss="0.5")
    assert bar.bar.postfix.endswith("eta=10 min")  # 1.5 s x 382 steps left
    bar.close()
