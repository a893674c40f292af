import pytest

from saeforge.cli import main
from saeforge.errors import SaeforgeError
from saeforge.web.serve import ServeConfig, bind, check_config


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_a_port_outside_the_tcp_range_is_an_error_not_a_traceback(port, capsys):
    assert main(["serve", "some/run", "--port", port]) == 2
    err = capsys.readouterr().err
    assert f"--port {port} is not a TCP port (0 to 65535)" in err and "fix: saeforge serve some/run --port 8000" in err


def test_the_edges_of_the_range_pass_the_check():
    for port in (0, 65535):
        check_config(ServeConfig(path="run", port=port))


def test_bind_names_the_problem_for_an_out_of_range_port():
    with pytest.raises(SaeforgeError, match="cannot listen on 127.0.0.1:99999"):
        bind("127.0.0.1", 99999)
