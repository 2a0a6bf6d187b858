"""`bevjepa eval` and `bevjepa closed-loop` write only into an empty folder or their own earlier output."""

from __future__ import annotations

from bevjepa.datasets import io as bevio
from bevjepa.tools import cli


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_eval_refuses_a_folder_of_other_work_and_a_file(synthetic_windows, tmp_path, capsys):
    before = _snapshot(synthetic_windows)
    args = ["eval", "--data", str(synthetic_windows), "--figures", "0", "--animation-windows", "0"]
    assert cli.main([*args, "--out", str(synthetic_windows)]) == 2  # a preprocessing output
    assert "holds files that are not this job's output" in capsys.readouterr().err
    assert _snapshot(synthetic_windows) == before
    a_file = tmp_path / "report.txt"
    a_file.write_text("mine")
    assert cli.main([*args, "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and a_file.read_text() == "mine"


def test_closed_loop_refuses_another_jobs_folder_before_any_episode(tmp_path, capsys):
    other = tmp_path / "training-run"
    other.mkdir()
    bevio.claim_output_folder(other, "train")
    (other / "state.json").write_text("{}")
    suite = "smoke"
    code = cli.main(["closed-loop", "--suite", suite, "--forecast", "cv", "--workers", "1", "--out", str(other)])
    assert code == 2
    assert "holds the output of 'bevjepa train'" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == [bevio.JOB_MARKER, "state.json"]
