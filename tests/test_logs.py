"""One quiet log: open_clip's root-logger INFO chatter is hidden under ``clbd`` while clbd's own INFO lines show;
``clbd --verbose`` (CLBD_LOG_LEVEL=INFO) shows the chatter again."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clbd import main
from clbd.logs import CLBD_LOGGERS, LOG_LEVEL_ENV

ROOT = Path(__file__).resolve().parents[1]
OPEN_CLIP_CHATTER = ("Parsing tokenizer identifier", "Attempting to load config from built-in", "Using default")


@pytest.fixture
def restored_levels(monkeypatch):
    """clbd's main sets the root and clbd loggers' levels; put them back for the tests after this one."""
    monkeypatch.setenv(LOG_LEVEL_ENV, "")
    names = ("", *CLBD_LOGGERS)
    before = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)


def chatter(records) -> list[str]:
    return [r.getMessage() for r in records if r.getMessage().startswith(OPEN_CLIP_CHATTER)]


def test_a_clip_fit_logs_clbd_info_but_no_open_clip_chatter(tmp_path, make_shards):
    """As a user runs it: ``python -m clbd fit`` in its own process, logging set up by clbd alone."""
    shards = make_shards(n=32, per_shard=16, captions=True)
    args = [
        "fit",
        "--model=lightning_modules.CLIP",
        "--model.model_name=clip-tiny-vit",
        "--data=datamodules.CLIPDataModule",
        "--data.model_name=clip-tiny-vit",
        f"--data.train_shards={shards}",
        "--data.val_shards=null",
        "--data.batch_size=16",
        "--data.num_workers=0",
        "--data.attack=poisoning.BadNet",
        "--data.attack.target_class=class1",
        "--data.attack.rate=0.2",
        "--trainer.max_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), LOG_LEVEL_ENV: ""}
    done = subprocess.run([sys.executable, "-m", "clbd", *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert [line for line in lines if any(text in line for text in OPEN_CLIP_CHATTER)] == []
    # open_clip's "No pretrained weights loaded ... initialized randomly" too: clbd asked for no weights on purpose
    assert not any("initialized randomly" in line for line in lines)
    assert any(line.startswith("INFO clbd.data: poisoning: ") for line in lines)


def test_verbose_shows_the_libraries_info_again(caplog, restored_levels):
    import open_clip

    assert main(["--verbose", "help"]) == 0
    open_clip.get_tokenizer("clip-tiny-vit")
    assert chatter(caplog.records)  # the same tokenizer creation logs its lines when asked


def test_a_bad_log_level_is_refused(monkeypatch, capsys, restored_levels):
    monkeypatch.setenv(LOG_LEVEL_ENV, "CHATTY")
    assert main(["help"]) == 2
    assert "CLBD_LOG_LEVEL='CHATTY' is not a log level" in capsys.readouterr().err
