"""``triggerfish up``'s shape flags: parsed, turned into the stack's options, passed on when detached."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.cli.main import _parser
from infra.cli.stack import stack_options, up_argv


def parse(*argv: str):  # noqa: ANN201
    return _parser().parse_args(["up", *argv])


def test_the_default_shape_is_one_replica_on_one_node_with_the_direct_data_plane() -> None:
    options = stack_options(parse(), Path("s"))

    assert (options.replicas, options.nodes, options.scale_to_zero, options.data_plane) == (1, 1, False, "direct")
    assert up_argv(parse())[-1] == "up"


def test_several_nodes_run_behind_haproxy_unless_told_otherwise() -> None:
    assert stack_options(parse("--replicas", "2", "--nodes", "2"), Path("s")).data_plane == "haproxy"
    assert stack_options(parse("--nodes", "2", "--data-plane", "direct"), Path("s")).data_plane == "direct"


def test_a_detached_up_runs_the_same_shape() -> None:
    argv = up_argv(parse("--replicas", "2", "--nodes", "3", "--scale-to-zero", "--idle-delay", "5"))

    tail = argv[argv.index("up") + 1 :]
    assert tail == ["--replicas", "2", "--nodes", "3", "--scale-to-zero", "--idle-delay", "5.0"]
    assert stack_options(_parser().parse_args(argv[argv.index("up") :]), Path("s")).nodes == 3


@pytest.mark.parametrize("flag", ["--replicas", "--nodes"])
def test_zero_replicas_or_nodes_are_refused(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(flag, "0")
    assert "must be >= 1, got 0" in capsys.readouterr().err
