import logging

from mpsd.cli.logs import setup_logging


def test_the_log_file_rolls_over_and_keeps_only_its_backups(tmp_path):
    log_file = tmp_path / "logs" / "mpsd.log"
    root = logging.getLogger()
    saved = root.handlers[:]
    try:
        setup_logging("text", log_file, max_bytes=2000, backups=2)
        for i in range(200):
            logging.getLogger("mpsd.test").info("line %d %s", i, "x" * 40)
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved
    files = sorted(p.name for p in log_file.parent.iterdir())
    assert files == ["mpsd.log", "mpsd.log.1", "mpsd.log.2"]
    assert all(p.stat().st_size <= 2100 for p in log_file.parent.iterdir())
    assert "line 199" in log_file.read_text()
