"""benchmarks/decoder.py: the GGUF <-> transformers name mapping covers every parameter of a
Gemma3 text model (the tied head aside) and round-trips."""

import importlib.util
import random
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")


def _decoder():
    path = Path(__file__).parent.parent / "benchmarks" / "decoder.py"
    spec = importlib.util.spec_from_file_location("decoder_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gguf_names_round_trip():
    decoder = _decoder()
    config = transformers.Gemma3TextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                           tie_word_embeddings=True)
    names = [n for n in transformers.Gemma3ForCausalLM(config).state_dict() if n != "lm_head.weight"]
    assert [decoder.hf_name(decoder.gguf_name(n)) for n in names] == names
    assert decoder.gguf_name("model.layers.1.self_attn.q_norm.weight") == "blk.1.attn_q_norm.weight"
    with pytest.raises(ValueError, match="blk.0.rope_freqs"):
        decoder.hf_name("blk.0.rope_freqs.weight")


def test_pieces_round_trip_compressed_and_refuse_a_damaged_one(tmp_path, monkeypatch):
    """The model's bytes travel to the GPU machine as zstd pieces: they reassemble exactly, and
    a damaged piece is named, not loaded."""
    decoder = _decoder()
    monkeypatch.setattr(decoder, "PIECE", 1000)
    blob = random.Random(0).randbytes(3000) + b"\x00" * 20_000  # about 3 KB compressed: 4 pieces
    data = {"model": "test"}
    decoder.split_pieces(blob, data, tmp_path)
    assert data["codec"] == "zstd" and len(data["pieces"]) >= 2
    assert decoder.read_pieces(tmp_path, data) == blob
    piece = tmp_path / data["pieces"][1]["file"]
    piece.write_bytes(piece.read_bytes()[:-1] + b"!")
    with pytest.raises(SystemExit, match=data["pieces"][1]["file"]):
        decoder.read_pieces(tmp_path, data)


def test_tiny_run_reports_the_cells_it_ran(tmp_path):
    """The CPU check end to end: every cell that ran is in the report (a cells folder bound
    when quality.py was imported once sent them where the report did not look)."""
    decoder = _decoder()
    assert decoder.main(["run", "--tiny", "--cache", str(tmp_path / "cache"), "--results", str(tmp_path)]) == 0
    cells = list((tmp_path / "cache" / "cells").glob("*.json"))
    report = (tmp_path / "decoder_tiny.md").read_text()
    assert cells and "| bitdelta | plain |" in report and "| dare-p0.99 | + DBMS, everything fitted |" in report


def test_tiny_floor_reports_each_tasks_smallest_version(tmp_path):
    """``floor``: each task's smallest storable version, exact and with 3-bit small tensors, by
    part, from what a commit refused (it writes nothing)."""
    import json

    decoder = _decoder()
    assert decoder.main(["floor", "--tiny", "--cache", str(tmp_path / "cache"), "--results", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "decoder_floor_tiny.json").read_text())["rows"]
    assert len(rows) == 6 and all(r["bytes"] == sum(r["parts"].values()) for r in rows)
    exact, lossy = rows[0], rows[1]
    assert lossy["parts"]["whole_tensors"] < exact["parts"]["whole_tensors"]
    assert "| sms_spam | exact |" in (tmp_path / "decoder_floor_tiny.md").read_text()


def test_retention_plot_draws_every_row_and_the_budgets(tmp_path):
    """The plot of quality.py and decoder.py has a style for every row, the budgeted commits
    included (a 'fit-all' row once broke a GPU run after its tables were written)."""
    pytest.importorskip("matplotlib")
    quality = _decoder()._quality()
    summary = [{"setting": setting, "row": row, "ratio_fp16_with_base_share": ratio, "retention": 0.99}
               for row in quality.ROWS for setting, ratio in (("bitdelta", 15.0), ("budget-100x", 100.0))]
    quality.plot_retention(summary, tmp_path / "plot.png", "tiny")
    assert (tmp_path / "plot.png").stat().st_size > 1000
