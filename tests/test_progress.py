"""pipeline/progress.py: the stages' one progress bar."""

from pipeline.progress import progress_bar


def test_no_bar_when_quiet_or_nothing_to_count():
    assert progress_bar(10, "queries", "query", enabled=False) is None
    assert progress_bar(0, "queries", "query") is None


def test_a_bar_counts_its_units_on_stderr(capsys):
    bar = progress_bar(4, "encode minilm", "text")
    bar.update(3)
    bar.close()
    err = capsys.readouterr().err
    assert "encode minilm" in err and "3/4" in err and "text/s" in err
