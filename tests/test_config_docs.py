"""docs/configuration.md is generated from the config dataclasses and must not go stale."""

import dataclasses
import typing

from vla_ft import config_docs
from vla_ft.config import Config


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(_keys(hints[f.name], f"{prefix}{f.name}."))
    return out


def test_reference_is_current():
    assert config_docs.DOC_PATH.read_text() == config_docs.render(), (
        "docs/configuration.md is stale: run `python -m vla_ft.config_docs`"
    )


def test_every_key_has_a_row_and_comments_are_attached():
    text = config_docs.render()
    rows = {line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `")}
    assert set(_keys(Config)) <= rows
    # a field's trailing comment and the comment block above a field both end up in its row
    line = next(r for r in text.splitlines() if r.startswith("| `collect.post_success_steps`"))
    assert "release" in line
    line = next(r for r in text.splitlines() if r.startswith("| `data.history`"))
    assert "frames per sample" in line


def test_check_mode_reports_stale(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    monkeypatch.setattr(config_docs, "DOC_PATH", stale)
    assert config_docs.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert config_docs.main([]) == 0
    assert config_docs.main(["--check"]) == 0
