"""Progress reads as progress: plain lines where no widget can render, nothing on stderr, nothing when off."""
from lessons_lib.lab import progress as progress_module
from lessons_lib.lab.progress import Progress


def test_headless_progress_prints_quarters_and_a_summary_to_stdout(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "_in_notebook", lambda: True)
    monkeypatch.setattr(progress_module, "widgets_available", lambda: False)
    bar = Progress(8, "aux loss run")
    for i in range(8):
        bar.step(loss=1.0 / (i + 1))
    bar.close()
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert err == "" and bar.mode == "text"
    assert lines[:3] == ["aux loss run: step 2/8, loss 0.5", "aux loss run: step 4/8, loss 0.25",
                         "aux loss run: step 6/8, loss 0.1667"]
    assert lines[3].startswith("aux loss run: 8 steps in ") and lines[3].endswith(" s, loss 0.125")


def test_progress_that_is_off_says_nothing(capsys):
    bar = Progress(3, "quiet", enabled=False)
    for _ in range(3):
        bar.step(loss=0.1)
    bar.close()
    assert capsys.readouterr() == ("", "")
