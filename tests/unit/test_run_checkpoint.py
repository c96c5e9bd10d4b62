"""Run-checkpoint discovery: only whole checkpoints count; a corrupt newest one falls back."""
import torch

from megatron_tppo.controller.run_checkpoint import latest_checkpoint, list_checkpoints


def _make(root, step, complete=True, state_ok=True):
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    if state_ok:
        torch.save({"step": step}, d / "run_state.pt")
    else:
        (d / "run_state.pt").write_bytes(b"not a torch file")
    if complete:
        (d / "COMPLETE").write_text("{}")
    return d


def test_latest_whole_checkpoint(tmp_path, capsys):
    assert latest_checkpoint(tmp_path / "none") is None
    _make(tmp_path, 2)
    _make(tmp_path, 10)
    _make(tmp_path, 12, complete=False)          # crashed while saving
    (tmp_path / ".step_00000014.tmp").mkdir()   # crashed before the rename
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000010"]
    assert latest_checkpoint(tmp_path).name == "step_00000010"
    _make(tmp_path, 11, state_ok=False)          # whole on disk but unreadable
    assert latest_checkpoint(tmp_path).name == "step_00000010"
    assert "step_00000011 is unreadable" in capsys.readouterr().out
