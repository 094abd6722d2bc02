"""The runner's files: verified reads (results, checkpoints, schema-1 results of Chapter 5), --retrain-corrupt,
atomic writes, per-run claims (stale, live, two processes at once) and ``sweep(jobs=2)``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from gradreg.experiments import RunConfig, RunRecord, load_results, run, runner, sweep
from gradreg.experiments import __main__ as cli
from gradreg.experiments.storage import StoredFileError, atomic_write_text, try_claim

TINY = dict(train_size=64, width=8, epochs=2, batch_size=32)
SGD = RunConfig(method="sgd", **TINY).resolved()
FGR = RunConfig(method="forward", gamma=0.1, eps=0.1, **TINY).resolved()
ROOT = Path(__file__).resolve().parents[1]
CHAPTER5 = ROOT / "chapters" / "results" / "05_mnist1d"


class Interrupt(Exception):
    pass


def _stop_after_first_epoch(epoch, metrics):
    raise Interrupt


def _without_times(history):
    return {k: v for k, v in history.items() if k != "seconds"}


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> Path:
    """A folder with the finished SGD and F-GR runs and, in ckpt/, each run's checkpoint after epoch 1."""
    folder = tmp_path_factory.mktemp("stored")
    for config in (SGD, FGR):
        run(config, folder)
        with pytest.raises(Interrupt):
            run(config, folder / "ckpt", on_epoch_end=_stop_after_first_epoch)
    return folder


def _copy(stored: Path, tmp_path: Path, *names: str) -> Path:
    for name in names:
        shutil.copy(stored / name, tmp_path / Path(name).name)
    return tmp_path


def _damage_result(path: Path, how: str, stored: Path) -> None:
    text = path.read_text()
    if how == "garbage":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    elif how == "empty":
        path.write_text("")
    elif how == "truncated":
        path.write_text(text[: len(text) // 2])
    elif how == "not an object":
        path.write_text("[1, 2, 3]")
    elif how == "edited":
        path.write_text(text.replace('"train_acc":', '"train_acc":0.999,"x":', 1))
    elif how == "section missing":
        values = json.loads(text)
        del values["final"]
        path.write_text(json.dumps(values))
    elif how == "renamed":  # the SGD result under the F-GR run's name
        shutil.copy(stored / f"{SGD.run_id}.json", path)


RESULT_DAMAGE = ["garbage", "empty", "truncated", "not an object", "edited", "section missing", "renamed"]


@pytest.mark.parametrize("how", RESULT_DAMAGE)
def test_a_bad_result_is_one_clear_error_naming_the_file_or_retrained(how, stored, tmp_path, capsys):
    path = _copy(stored, tmp_path, f"{FGR.run_id}.json") / f"{FGR.run_id}.json"
    _damage_result(path, how, stored)
    for read in (lambda: run(FGR, tmp_path), lambda: load_results(tmp_path), lambda: RunRecord.load(path)):
        with pytest.raises(StoredFileError) as info:
            read()
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "--retrain-corrupt" in message and "delete it" in message
    record = run(FGR, tmp_path, retrain_corrupt=True)
    assert record.config == FGR and record.final == RunRecord.load(stored / f"{FGR.run_id}.json").final
    assert f"{path}: " in capsys.readouterr().err
    assert RunRecord.load(path).config == FGR


def _damage_checkpoint(path: Path, how: str, stored: Path) -> None:
    data = path.read_bytes()
    if how == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "schema-less":  # a checkpoint as gradreg 0.2 wrote it: the state without its header
        state = torch.load(path, weights_only=True)
        torch.save({k: v for k, v in state.items() if k not in ("schema", "run_id", "config")}, path)
    elif how == "renamed":  # the SGD checkpoint under the F-GR run's name
        shutil.copy(stored / "ckpt" / f"{SGD.run_id}.ckpt.pt", path)
    elif how == "pickle":  # not loadable with weights_only=True
        torch.save({"schema": 2, "thing": Interrupt()}, path)


@pytest.mark.parametrize("how", ["garbage", "empty", "truncated", "schema-less", "renamed", "pickle"])
def test_a_bad_checkpoint_is_one_clear_error_never_resumed_silently(how, stored, tmp_path):
    path = _copy(stored, tmp_path, f"ckpt/{FGR.run_id}.ckpt.pt") / f"{FGR.run_id}.ckpt.pt"
    _damage_checkpoint(path, how, stored)
    with pytest.raises(StoredFileError) as info:
        run(FGR, tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "--retrain-corrupt" in message, message
    if how == "renamed":
        assert f"is the checkpoint of run {SGD.run_id}, not of {FGR.run_id}" in message
    assert not (tmp_path / f"{FGR.run_id}.json").exists()
    record = run(FGR, tmp_path, retrain_corrupt=True)  # from the start: the uninterrupted run
    whole = RunRecord.load(stored / f"{FGR.run_id}.json")
    assert record.meta["resumed_from_epoch"] is None
    assert _without_times(record.history) == _without_times(whole.history) and record.final == whole.final


def test_a_checkpoint_carries_its_run_and_schema_and_resumes(stored, tmp_path):
    path = _copy(stored, tmp_path, f"ckpt/{FGR.run_id}.ckpt.pt") / f"{FGR.run_id}.ckpt.pt"
    state = torch.load(path, weights_only=True)
    assert state["schema"] == runner.SCHEMA and state["run_id"] == FGR.run_id and state["config"] == FGR.to_dict()
    record = run(FGR, tmp_path)
    whole = RunRecord.load(stored / f"{FGR.run_id}.json")
    assert record.meta["resumed_from_epoch"] == 1 and record.final == whole.final


def test_a_result_carries_schema_config_and_checksum(stored):
    values = json.loads((stored / f"{SGD.run_id}.json").read_text())
    assert values["schema"] == runner.SCHEMA and values["run_id"] == SGD.run_id
    assert values["config"] == SGD.to_dict() and len(values["checksum"]) == 64


def test_the_schema_less_results_of_chapter_5_still_load_and_are_verified(tmp_path):
    records = load_results(CHAPTER5)
    assert len(records) == 75 and all("schema" not in json.loads(p.read_text()) for p in CHAPTER5.glob("*.json"))
    assert all(r.config.epochs == 50 for r in records)
    # a schema-less file is still checked: under another run's name it is refused
    source = sorted(CHAPTER5.glob("*.json"))[0]
    other = RunConfig.from_dict({**records[0].config.to_dict(), "seed": 99})
    shutil.copy(source, tmp_path / f"{other.run_id}.json")
    with pytest.raises(StoredFileError, match="renamed or copied over"):
        load_results(tmp_path)


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "old")

    class Boom(Exception):
        pass

    def write(file):
        file.write(b"half")
        raise Boom

    with pytest.raises(Boom):
        runner.atomic_write(path, write)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_the_cli_reports_a_corrupt_file_in_one_line_and_retrains_on_request(stored, tmp_path):
    path = _copy(stored, tmp_path, f"{SGD.run_id}.json") / f"{SGD.run_id}.json"
    path.write_text('{"config": ')
    argv = [sys.executable, "-m", "gradreg.experiments", "run", "--train-size", "64", "--width", "8", "--epochs",
            "2", "--batch-size", "32", "--results", str(tmp_path), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"python -m gradreg.experiments: error: {path}: is not valid JSON (Expecting value at character 11: "
        "truncated or overwritten?); delete it to train this run again, or rerun with --retrain-corrupt "
        "(run(..., retrain_corrupt=True)), which does that"]
    assert cli.main([*argv[3:], "--retrain-corrupt"]) == 0
    assert RunRecord.load(path).final == RunRecord.load(stored / f"{SGD.run_id}.json").final


# ------------------------------------------------------------------------------------------- claims, processes


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _claim(folder: Path, config: RunConfig, pid: int) -> Path:
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{config.run_id}.claim"
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "token": "other"}))
    return path


def test_a_stale_claim_of_a_dead_process_is_taken_over(tmp_path, capsys):
    pid = _dead_pid()
    claim = _claim(tmp_path, SGD, pid)
    record = run(SGD, tmp_path)
    assert record.config == SGD and not claim.exists()
    assert f"taking over the stale claim of pid {pid}" in capsys.readouterr().err


def test_a_run_claimed_by_a_live_process_is_left_for_later_then_waited_for(tmp_path, monkeypatch, capsys):
    """sweep trains the next run first and says so; when the holder dies, its claim is stale and taken over."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _claim(tmp_path, SGD, holder.pid)
        assert try_claim(tmp_path / f"{SGD.run_id}.claim")[0] is None
        monkeypatch.setattr(runner, "POLL_SECONDS", 0.05)
        order = []
        original = runner._train

        def train(config, *args, **kwargs):
            order.append(config.method)
            if config.method == "forward":  # the other process "dies" once this run is done
                threading.Timer(0.3, lambda: (holder.kill(), holder.wait())).start()  # reaped: no zombie
            return original(config, *args, **kwargs)

        monkeypatch.setattr(runner, "_train", train)
        records = sweep([SGD, FGR], tmp_path, show_progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert order == ["forward", "sgd"] and [r.config for r in records] == [SGD, FGR]
    err = capsys.readouterr().err.splitlines()
    assert f"gradreg: {SGD.run_id}: being trained by pid {holder.pid}" in err[0]
    assert err[0].endswith("training the next run first")
    assert any("waiting for it" in line for line in err) and any("taking over the stale claim" in line for line in err)


def test_two_processes_on_one_results_folder_both_finish_with_the_sequential_results(stored, tmp_path):
    argv = [sys.executable, "-m", "gradreg.experiments", "run", "--methods", "sgd", "forward", "--gamma", "0.1",
            "--eps", "0.1", "--train-size", "64", "--width", "8", "--epochs", "2", "--batch-size", "32",
            "--results", str(tmp_path), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_out, err) in zip(procs, outs):
        assert proc.returncode == 0 and "Traceback" not in err, err
    for config in (SGD, FGR):
        mine, reference = RunRecord.load(tmp_path / f"{config.run_id}.json"), RunRecord.load(stored /
                                                                                           f"{config.run_id}.json")
        assert _without_times(mine.history) == _without_times(reference.history)
        assert mine.final == reference.final
    assert sorted(p.suffix for p in tmp_path.iterdir() if not p.name.startswith(".")) == [".json", ".json"]


def test_run_jobs_2_trains_in_two_worker_processes_with_the_sequential_results(stored, tmp_path, capsys):
    """``--jobs 2`` (sweep(jobs=2)): each worker claims runs in turn; the results equal the sequential runs."""
    argv = ["run", "--methods", "sgd", "forward", "--gamma", "0.1", "--eps", "0.1", "--train-size", "64", "--width",
            "8", "--epochs", "2", "--batch-size", "32", "--results", str(tmp_path), "--no-progress", "--jobs", "2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(2 * threads)  # each worker gets 2·threads // 2: the thread count of the stored runs
    try:
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert "training 2 runs in 2 worker processes" in capsys.readouterr().err
    for config in (SGD, FGR):
        mine, reference = (RunRecord.load(f / f"{config.run_id}.json") for f in (tmp_path, stored))
        assert mine.meta["threads"] == reference.meta["threads"] and mine.final == reference.final
        assert _without_times(mine.history) == _without_times(reference.history)
    with pytest.raises(ValueError, match="jobs must be an integer >= 1"):
        sweep([SGD], tmp_path, jobs=0)
