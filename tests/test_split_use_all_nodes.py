"""A refusal caused by --use-all-nodes says so: it is not blamed on the context or the streams."""

import subprocess
import sys

from costtables import GiB, MiB, make_table, write_cluster

CMD = [sys.executable, "-c", "import sys; from graphsplit.cli import main; sys.exit(main())"]


def test_use_all_nodes_refusal_names_the_flag_and_the_node_left_out(tmp_path):
    t = {"big": make_table("big", 8, weight_bytes=100 * MiB, memory_usable=4 * GiB),
         "tiny": make_table("tiny", 8, weight_bytes=100 * MiB, memory_usable=20 * MiB)}
    cluster = write_cluster(tmp_path, t)
    ok = subprocess.run(CMD + [str(cluster)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr  # it fits on `big` alone
    r = subprocess.run(CMD + [str(cluster), "--use-all-nodes"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "--use-all-nodes" in line and "tiny" in line, line
    assert "drop --use-all-nodes" in line and "--context-tokens" not in line, line


def test_a_prompt_too_long_to_fit_blames_prompt_tokens_not_context(tmp_path):
    t = {"a": make_table("a", 8), "b": make_table("b", 8)}
    cluster = write_cluster(tmp_path, t)
    r = subprocess.run(CMD + [str(cluster), "--prompt-tokens", "16777216"], capture_output=True,
                       text=True, timeout=120)
    line = r.stderr.strip()
    assert r.returncode == 2 and "\n" not in line and "does not fit" in line, line
    assert "lower --prompt-tokens" in line and "--context-tokens" not in line
    assert "--streams" not in line  # one stream: not the cause
