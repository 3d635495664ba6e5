"""
The hand-offs a new user meets after `bash speedrun.sh` (CPU preset): the commands it prints
at the end, and the README's next steps, run as printed in a new shell (no venv activated,
NANOCHAT_BASE_DIR unset, another directory), and a missing checkpoint names the base dir
that does hold it.

The preset's artifacts are stood in for by the fixture d2 model, copied into a temporary
HOME as ~/.cache/nanochat-cpu/{base,chatsft}_checkpoints/cpu_tiny.

python -m pytest tests/test_handoffs.py -q
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def preset_home(upstream_fixtures, tmp_path):
    """A HOME whose ~/.cache/nanochat-cpu looks like the CPU preset's, with the d2 model as cpu_tiny."""
    home = tmp_path / "home"
    base = home / ".cache" / "nanochat-cpu"
    shutil.copytree(upstream_fixtures / "tokenizer", base / "tokenizer")
    for family in ("base_checkpoints", "chatsft_checkpoints"):
        shutil.copytree(upstream_fixtures / "base_checkpoints" / "d2", base / family / "cpu_tiny")
    for p in base.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    (base / "report.md").write_text("# report card\n")
    return home


def clean_env(home):
    """What a new shell has: a HOME and the system PATH, nothing of this session's setup."""
    return {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "OMP_NUM_THREADS": "1",
            "LANG": os.environ.get("LANG", "C.UTF-8")}


def speedrun_next_steps(home):
    """The lines the CPU preset prints at its end, from speedrun.sh's own next-steps block,
    run the way speedrun.sh runs it: venv python on PATH, NANOCHAT_BASE_DIR exported."""
    text = (REPO / "speedrun.sh").read_text()
    block = re.search(r"^# >>> next steps.*?^# <<< next steps$", text, re.S | re.M)
    assert block, "speedrun.sh lost its '# >>> next steps' ... '# <<< next steps' block"
    env = dict(clean_env(home), NANOCHAT_BASE_DIR=str(home / ".cache" / "nanochat-cpu"),
               PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin")
    script = 'START_TIME=$(date +%s); step() { echo "=== $*"; }\n' + block.group(0)
    r = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()


def run_in_new_shell(command, home, cwd, timeout=300):
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=clean_env(home),
                          capture_output=True, text=True, timeout=timeout)


def test_printed_chat_and_report_commands_run_as_printed(preset_home, tmp_path):
    lines = speedrun_next_steps(preset_home)
    assert lines[-1].startswith("Chat: "), lines
    chat_command = lines[-1][len("Chat: "):]
    r = run_in_new_shell(chat_command + " --prompt 'What is the capital of France?' --max_tokens=8 --temperature=0",
                         preset_home, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "error" not in r.stderr.lower()
    assert "continues your text" not in r.stderr  # the printed command chats with the SFT model
    (report_line,) = [line for line in lines if line.startswith("Report: ")]
    r = run_in_new_shell(report_line[len("Report: "):], preset_home, cwd=tmp_path, timeout=30)
    assert r.returncode == 0 and r.stdout == "# report card\n", r.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_printed_web_command_serves(preset_home, tmp_path):
    (web_line,) = [line for line in speedrun_next_steps(preset_home) if line.startswith("Web: ")]
    command = web_line[len("Web: "):].split("#")[0].strip() + f" --host 127.0.0.1 -p {free_port()}"
    proc = subprocess.Popen(["bash", "-c", command], cwd=tmp_path, env=clean_env(preset_home),
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline, seen = time.time() + 240, ""
        while time.time() < deadline and "Starting NanoChat Web Server" not in seen and proc.poll() is None:
            seen += proc.stderr.readline()
        assert "Starting NanoChat Web Server" in seen, seen
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # bash and the server it started
        proc.wait(timeout=30)


def test_readme_next_steps_chat_runs_in_a_new_shell(preset_home):
    """The README's next-steps block: activate, then the chat line, as written (with --prompt)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- next steps -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its '<!-- next steps -->' block"
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    activate = [line for line in lines if line.startswith("source ")]
    chat_lines = [line for line in lines if line.startswith("python -m nanochat.chat")]
    assert activate and chat_lines
    for chat_line in chat_lines:  # the SFT chat, then the base model continuing text
        r = run_in_new_shell(" && ".join(activate + [chat_line + " --prompt hi --max_tokens=4"]), preset_home, cwd=REPO)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip()
        assert ("continues your text" in r.stderr) == ("--source=base" in chat_line)


def test_missing_checkpoint_names_the_base_dir_that_holds_it(preset_home, monkeypatch):
    """The classic slip: the preset's model, looked for in the default ~/.cache/nanochat."""
    from nanochat.checkpoint_manager import load_model
    monkeypatch.setenv("HOME", str(preset_home))
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    with pytest.raises(FileNotFoundError) as info:
        load_model("sft", torch.device("cpu"), phase="eval", model_tag="cpu_tiny")
    message = str(info.value)
    assert "\n" not in message
    assert f"NANOCHAT_BASE_DIR={preset_home / '.cache' / 'nanochat-cpu'}" in message
    assert "chatsft_checkpoints/cpu_tiny" in message
    # a tag no base dir has: the plain advice, no false lead
    with pytest.raises(FileNotFoundError) as info:
        load_model("sft", torch.device("cpu"), phase="eval", model_tag="d99")
    assert "is there: set" not in str(info.value) and "train a model first" in str(info.value)
