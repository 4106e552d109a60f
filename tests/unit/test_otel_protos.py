"""The install step's repair of ``opentelemetry-proto`` files that ``xds-protos`` unpacked
over them (the OTLP exporter then fails to import)."""

from __future__ import annotations

import base64
import hashlib
from importlib import metadata
from pathlib import Path

from epp.devtools.otel_protos import DISTRIBUTION, overwritten_files


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(
        b"=").decode()


def fake_distribution(root: Path, files: dict[str, bytes]) -> metadata.Distribution:
    info = root / "demo-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n")
    lines = []
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        lines.append(f"{name},{record_hash(data)},{len(data)}")
    lines.append("demo-1.0.dist-info/RECORD,,")
    (info / "RECORD").write_text("\n".join(lines) + "\n")
    return metadata.PathDistribution(info)


def test_files_replaced_by_another_distribution_are_found(tmp_path: Path) -> None:
    dist = fake_distribution(tmp_path, {"pkg/a_pb2.py": b"new", "pkg/b_pb2.py": b"kept"})
    assert overwritten_files(dist) == []
    (tmp_path / "pkg/a_pb2.py").write_bytes(b"older copy from another wheel")
    (tmp_path / "pkg/b_pb2.py").unlink()
    assert sorted(overwritten_files(dist)) == ["pkg/a_pb2.py", "pkg/b_pb2.py"]


def test_this_environment_has_opentelemetry_protos_of_their_own() -> None:
    # The install step ran the repair; the tracing tests depend on it.
    assert overwritten_files(metadata.distribution(DISTRIBUTION)) == []
