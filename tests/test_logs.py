"""Quiet logs: third-party INFO off unless hydra.verbose names it; our repeated notices once."""
import logging

import pytest

from cultureclip import logs


@pytest.fixture
def restore_levels():
    saved = {n: logging.getLogger(n).level for n in logs.NOISY}
    yield
    for n, level in saved.items():
        logging.getLogger(n).setLevel(level)


def test_faiss_loader_and_http_lines_are_off_by_default(restore_levels, caplog):
    for n in logs.NOISY:
        logging.getLogger(n).setLevel(logging.NOTSET)
    quieted = logs.quiet(False)
    assert {"faiss.loader", "httpx", "httpx2"} <= set(quieted)
    with caplog.at_level(logging.INFO):
        logging.getLogger("faiss.loader").info("Loading faiss with AVX512 support.")
        logging.getLogger("httpx2").info("HTTP Request: POST ...")
        logging.getLogger("faiss.loader").warning("a real problem")
    assert [r.getMessage() for r in caplog.records] == ["a real problem"]


@pytest.mark.parametrize("verbose, loud", [(True, set(logs.NOISY)), ("faiss", {"faiss", "faiss.loader"}),
                                           (["httpx", "lightning"], {"httpx", "lightning.fabric.utilities.seed",
                                                                     "lightning.pytorch.utilities.rank_zero",
                                                                     "lightning.fabric.utilities.rank_zero"})])
def test_hydra_verbose_brings_them_back(restore_levels, verbose, loud):
    for n in logs.NOISY:
        logging.getLogger(n).setLevel(logging.NOTSET)
    logs.quiet(verbose)
    assert {n for n in logs.NOISY if logging.getLogger(n).level == logging.NOTSET} == loud


def test_once_logs_a_notice_once_per_key(caplog):
    log = logging.getLogger("cultureclip.test_once")
    with caplog.at_level(logging.INFO, logger="cultureclip.test_once"):
        for _ in range(3):
            logs.once(log, logging.INFO, "test-key-a", "%s is not set", "MY_KEY")
        logs.once(log, logging.INFO, "test-key-b", "%s is not set", "OTHER_KEY")
    assert [r.getMessage() for r in caplog.records] == ["MY_KEY is not set", "OTHER_KEY is not set"]


def test_a_missing_api_key_variable_is_said_once_for_many_clients(caplog, monkeypatch):
    from cultureclip.curate.backends import chat
    monkeypatch.delenv("CC_TEST_ONCE_KEY", raising=False)
    with caplog.at_level(logging.INFO, logger=chat.log.name):
        for _ in range(3):
            chat.ChatClient({"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "CC_TEST_ONCE_KEY"})
    assert sum("CC_TEST_ONCE_KEY is not set" in r.getMessage() for r in caplog.records) == 1
