"""The storage emulator bench on a real fake-gcs-server, both backends, a small bucket."""

from __future__ import annotations

import pytest

from infra.bench.storage_emulator import main, measure

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("backend", ["memory", "filesystem"])
def test_each_step_writes_then_reads_back_what_it_wrote(backend: str) -> None:
    steps = measure(backend, objects=40, step=20, concurrency=4)

    assert [(s.backend, s.objects) for s in steps] == [(backend, 0), (backend, 20)]
    assert all(s.writes_per_s > 0 and s.reads_per_s > 0 and s.write_p50_ms > 0 for s in steps)


def test_bad_sizes_are_refused_naming_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--objects", "0"])
    assert "--objects, --step and --concurrency must be positive" in capsys.readouterr().err
